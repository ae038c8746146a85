"""One grpc.aio `DevicePlugin` server per resource, on its own unix socket.

Core values (devices, container edits) are converted to and from protobuf here; registration.py,
liveness.py and manager.py (the registration options type) use the generated types too, and
nothing outside kubelet/ (and the shipped fakes in testing/) does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc

from nvdp import unix_sockets
from nvdp.config.inputs import KUBELET_MAX_MESSAGE_BYTES as KUBELET_MAX_MESSAGE_BYTES  # re-exported
from nvdp.config.options import Config
from nvdp.core.allocation import preferred
from nvdp.core.container import ContainerEdits, edits_for, edits_repeat
from nvdp.core.devices import Device, Health, Resource, Topology
from nvdp.errors import AllocationError, ServeError
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet._proto import api_pb2_grpc as pb_grpc
from nvdp.kubelet.malformed import MalformedRequests

log = logging.getLogger("nvdp.server")  # stable name: operators filter on it
Context = grpc.aio.ServicerContext[Any, Any]
AllocateHook = Callable[[str, Sequence[str], Exception | None], None]
# Stopping: calls get STOP_GRACE_S to finish; after that the connections still open are closed
# from our side (a client that stopped reading keeps grpc.aio's stop waiting forever otherwise),
# and `stop()` returns by STOP_DEADLINE_S whatever the clients do.
STOP_GRACE_S = 0.5
STOP_DEADLINE_S = STOP_GRACE_S + 1.0
# PreStartContainer's check (--gpu-hygiene): the resource and the device IDs the container gets;
# None to let it start, else why not (the kubelet fails the container start with that text).
PreStartHook = Callable[[Resource, Sequence[str]], Awaitable[str | None]]

# Allocate answers remembered per snapshot (one entry per distinct request): the kubelet asks
# for the same few device sets over and over, and an answer depends only on the snapshot and
# the serving context (unless edits_repeat says otherwise). The context is frozen and carries
# all the rest: the config (strategies, MPS root and sharing), the control devices and the CDI
# classes written; a new one (reload, CDI refresh) is a new object and drops the answers.
ANSWER_CACHE_SIZE = 256


@dataclass(frozen=True)
class ServingContext:
    """What every resource server needs besides its devices; replaced as a whole on reload."""

    config: Config
    topology: Topology
    control_devices: tuple[str, ...]
    cdi_classes: frozenset[str] | None = None  # CDI specs nvdp wrote (None: none; see container.edits_for)


def socket_name(resource: str) -> str:
    """The official plugin's socket per resource: nvidia.com/mig-1g.10gb -> nvidia-mig-1g.10gb.sock."""
    return f"nvidia-{resource.split('/', 1)[-1]}.sock"


# The kubelet's health strings (v1beta1 constants), kept at the edge.
WIRE_HEALTH = {Health.HEALTHY: "Healthy", Health.UNHEALTHY: "Unhealthy"}


def device_message(device: Device) -> pb.Device:
    topology = None
    if device.numa_node is not None:
        topology = pb.TopologyInfo(nodes=[pb.NUMANode(ID=device.numa_node)])
    return pb.Device(ID=device.id, health=WIRE_HEALTH[device.health], topology=topology)


def allocate_message(edits: ContainerEdits) -> pb.ContainerAllocateResponse:
    return pb.ContainerAllocateResponse(
        envs=edits.envs,
        mounts=[
            pb.Mount(container_path=m.container_path, host_path=m.host_path, read_only=m.read_only)
            for m in edits.mounts
        ],
        devices=[
            pb.DeviceSpec(container_path=d.container_path, host_path=d.host_path, permissions=d.permissions)
            for d in edits.devices
        ],
        annotations=edits.annotations,
        cdi_devices=[pb.CDIDevice(name=n) for n in edits.cdi_devices],
    )


class ResourceServer(pb_grpc.DevicePluginServicer):
    """Serves one resource: the current snapshot plus a version number behind a Condition.

    Every open ListAndWatch stream sends the full list, then waits for the next version, so any
    number of streams (the kubelet holds one; tools may hold more) all see the latest state.

    Resource handling: `start()` replaces a stale socket (never anything else: a file or folder
    at the path is a ServeError), binds 0600 and starts the gRPC server; `stop()` ends every
    stream, stops the server within STOP_DEADLINE_S and removes the socket if it is still ours.

    Memory: a stream sends only the latest list and gRPC takes one write at a time, so a client
    that stops reading holds at most the list in flight, however many updates follow.
    """

    def __init__(
        self,
        resource: Resource,
        context: ServingContext,
        socket_dir: str,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        on_allocate: AllocateHook | None = None,
        pre_start: PreStartHook | None = None,
    ) -> None:
        """`interceptors` wrap every call (timing for metrics); `on_allocate` sees each Allocate's
        (resource name, request ids, error or None) once the call is decided; `pre_start`, when
        given and --gpu-hygiene is on, is asked before each container start (PreStartContainer)."""
        self.resource = resource
        self.context = context
        self.socket_path = os.path.join(socket_dir, socket_name(resource.name))
        self.version = 0
        self._changed = asyncio.Condition()
        self._message: tuple[int, pb.ListAndWatchResponse] | None = None  # (version, list message)
        self._too_large = False
        self._server: grpc.aio.Server | None = None
        self._identity: unix_sockets.Identity | None = None  # the socket we bound
        self._stopping = False
        self._writing: set[asyncio.Task[Any]] = set()  # stream handlers with a list handed to gRPC
        self._left_behind: set[asyncio.Future[None]] = set()  # stops that missed the deadline
        self._on_allocate = on_allocate
        self._pre_start = pre_start
        # Innermost: a request that does not decode is refused before any handler (or metrics) sees it.
        self._interceptors = (*interceptors, MalformedRequests(resource.name))
        self._answers: dict[tuple[tuple[str, ...], ...], pb.AllocateResponse] = {}
        self._answers_for: tuple[int, Resource, ServingContext] | None = None  # what they were built from

    @property
    def name(self) -> str:
        return self.resource.name

    @property
    def pre_start_required(self) -> bool:
        """PreStartContainer is advertised only with --gpu-hygiene (the kubelet then calls it
        before every container start, with a 30 s deadline). The kubelet reads the options at
        registration: a reload that switches it takes effect when the resource registers again."""
        return self._pre_start is not None and self.context.config.gpu_hygiene

    def options(self) -> pb.DevicePluginOptions:
        """The one source of the options sent in Register and in GetDevicePluginOptions."""
        return pb.DevicePluginOptions(pre_start_required=self.pre_start_required,
                                      get_preferred_allocation_available=True)

    async def update(self, resource: Resource) -> None:
        """A new device snapshot: every open ListAndWatch stream sends the full list again."""
        async with self._changed:
            self.resource = resource
            self.version += 1
            self._changed.notify_all()

    def socket_alive(self) -> bool:
        """Serving, and the path is still our socket (not deleted, nor replaced by another file)."""
        return self._server is not None and unix_sockets.is_ours(self.socket_path, self._identity)

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Raises ServeError when the socket cannot be bound (folder missing or read-only, or
        something other than a socket at the path)."""
        problem = unix_sockets.replace_problem(self.socket_path)
        if problem is not None:
            raise ServeError(f"cannot serve {self.name}: {problem}")
        try:
            unix_sockets.remove_stale(self.socket_path)  # from an earlier run
        except OSError as exc:
            raise ServeError(f"cannot serve {self.name} on {self.socket_path}: {exc}") from exc
        self._stopping = False
        server = grpc.aio.server(interceptors=self._interceptors)
        pb_grpc.add_DevicePluginServicer_to_server(self, server)
        try:
            with unix_sockets.private_umask():
                server.add_insecure_port(f"unix://{self.socket_path}")
            self._identity = unix_sockets.bound(self.socket_path)
        except (RuntimeError, OSError) as exc:  # grpc says only "Failed to bind"; the folder is the usual cause
            why = "the folder is missing" if not os.path.isdir(os.path.dirname(self.socket_path)) else exc
            raise ServeError(f"cannot serve {self.name} on {self.socket_path}: {why}") from exc
        self._server = server  # before awaiting: a stop during start stops this server too
        await server.start()
        log.info("serving", extra={"resource": self.name, "socket": self.socket_path})

    async def stop(self) -> None:
        server, self._server = self._server, None
        async with self._changed:
            self._stopping = True
            self._changed.notify_all()  # streams waiting for news end now
        if server is not None:
            for handler in list(self._writing):  # blocked in a write: they would never see `_stopping`
                handler.cancel()
            await self._stop_within_deadline(server)
        ours, self._identity = self._identity, None
        unix_sockets.remove_if_ours(self.socket_path, ours)  # not a socket someone else bound since

    async def _stop_within_deadline(self, server: grpc.aio.Server) -> None:
        """grpc.aio's stop waits until every connection is gone, and a connection whose client
        stopped reading never goes while its write is stuck: after the grace, close what is left."""
        stopping = asyncio.ensure_future(server.stop(grace=STOP_GRACE_S))
        start = time.monotonic()
        done, _ = await asyncio.wait({stopping}, timeout=STOP_GRACE_S + 0.1)
        if not done:
            closed = unix_sockets.close_connections(self.socket_path)
            log.warning("a client did not let the server stop (it stopped reading?); its connection was closed",
                        extra={"resource": self.name, "connections": closed})
            done, _ = await asyncio.wait({stopping}, timeout=max(0.0, STOP_DEADLINE_S - (time.monotonic() - start)))
        if not done:
            log.error("the gRPC server did not stop in time; serving goes on without it",
                      extra={"resource": self.name, "deadline_s": STOP_DEADLINE_S})
            self._left_behind.add(stopping)  # keep a reference until it finishes on its own
            stopping.add_done_callback(self._left_behind.discard)

    async def restart(self) -> None:
        """Serve again on a fresh socket (ours was deleted by a kubelet restart)."""
        await self.stop()
        await self.start()

    def list_message(self) -> pb.ListAndWatchResponse:
        """The device list every stream sends: built once per version (not once per stream) and
        checked against the kubelet's limit, which rejects the whole list when it is exceeded."""
        if self._message is None or self._message[0] != self.version:
            message = pb.ListAndWatchResponse(devices=[device_message(d) for d in self.resource.devices])
            self._message = (self.version, message)
            self._check_size(message.ByteSize())
        return self._message[1]

    def _check_size(self, size: int) -> None:
        too_large = size > KUBELET_MAX_MESSAGE_BYTES
        if too_large and not self._too_large:
            log.error(
                "device list too large: the kubelet will reject it; lower the time-slicing replicas",
                extra={"resource": self.name, "devices": len(self.resource.devices), "bytes": size,
                       "limit": KUBELET_MAX_MESSAGE_BYTES},
            )
        elif self._too_large and not too_large:
            log.info("device list fits the kubelet's limit again", extra={"resource": self.name, "bytes": size})
        self._too_large = too_large

    def _has_news(self, sent: int) -> bool:
        return self._stopping or self.version != sent

    # --- DevicePlugin service -----------------------------------------------------------------

    async def GetDevicePluginOptions(
        self, request: pb.Empty, context: Context
    ) -> pb.DevicePluginOptions:
        return self.options()

    async def ListAndWatch(
        self, request: pb.Empty, context: Context
    ) -> AsyncIterator[pb.ListAndWatchResponse]:
        sent = -1
        handler = asyncio.current_task()
        assert handler is not None
        while True:
            async with self._changed:
                await self._changed.wait_for(partial(self._has_news, sent))
                if self._stopping:
                    return
                sent = self.version
                message = self.list_message()
            self._writing.add(handler)
            try:
                yield message  # returns once gRPC took the message: never, for a client that stopped reading
            finally:
                self._writing.discard(handler)

    async def GetPreferredAllocation(
        self, request: pb.PreferredAllocationRequest, context: Context
    ) -> pb.PreferredAllocationResponse:
        responses = []
        for req in request.container_requests:
            ids = preferred(
                self.resource,
                list(req.available_deviceIDs),
                list(req.must_include_deviceIDs),
                req.allocation_size,
                self.context.topology,
                self.context.config.shared_devices_allocation_policy,
            )
            responses.append(pb.ContainerPreferredAllocationResponse(deviceIDs=ids))
        return pb.PreferredAllocationResponse(container_responses=responses)

    async def Allocate(
        self, request: pb.AllocateRequest, context: Context
    ) -> pb.AllocateResponse:
        requested = tuple(tuple(req.devices_ids) for req in request.container_requests)
        answer = self._cached_answer(requested)
        if answer is None:
            responses = []
            for ids in requested:
                try:
                    edits = edits_for(self.resource, list(ids), self.context.config, self.context.control_devices,
                                      cdi_classes=self.context.cdi_classes)
                except AllocationError as exc:
                    self._report_allocation(ids, exc)
                    log.warning("allocation refused", extra={"resource": self.name, "error": str(exc)})
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                responses.append(allocate_message(edits))
            answer = pb.AllocateResponse(container_responses=responses)
            if edits_repeat(self.context.config):
                self._remember_answer(requested, answer)
        for ids in requested:  # counted only now: one refused container fails the whole call
            self._report_allocation(ids, None)
        return answer

    def _cached_answer(self, requested: tuple[tuple[str, ...], ...]) -> pb.AllocateResponse | None:
        made_from = self._answers_for
        if made_from is None or made_from[0] != self.version or made_from[1] is not self.resource \
                or made_from[2] is not self.context:  # a new snapshot or a reload: start over
            self._answers.clear()
            self._answers_for = (self.version, self.resource, self.context)
            return None
        return self._answers.get(requested)

    def _remember_answer(self, requested: tuple[tuple[str, ...], ...], answer: pb.AllocateResponse) -> None:
        if len(self._answers) >= ANSWER_CACHE_SIZE:
            del self._answers[next(iter(self._answers))]  # the oldest
        self._answers[requested] = answer

    def _report_allocation(self, ids: Sequence[str], error: Exception | None) -> None:
        if self._on_allocate is not None:
            self._on_allocate(self.name, ids, error)

    async def PreStartContainer(
        self, request: pb.PreStartContainerRequest, context: Context
    ) -> pb.PreStartContainerResponse:
        if self._pre_start is not None and self.context.config.gpu_hygiene:
            problem = await self._pre_start(self.resource, list(request.devices_ids))
            if problem is not None:
                log.warning("container start refused", extra={"resource": self.name, "error": problem})
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        return pb.PreStartContainerResponse()
