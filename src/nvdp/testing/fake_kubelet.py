"""A kubelet device manager, as strict as the real one, on a unix socket in a folder.

What it does, as the kubelet does it:
- serves `v1beta1.Registration` on `<folder>/kubelet.sock`;
- Register: rejects versions other than v1beta1, resource names that are not extended resources,
  endpoints that are not a bare file name; dials `<folder>/<endpoint>` and calls
  GetDevicePluginOptions before answering (a plugin that cannot be dialled fails registration);
  a second Register for a name replaces the earlier endpoint;
- then holds ListAndWatch open; every message replaces the device list (capacity = all devices,
  allocatable = healthy ones); when the stream ends, every device of the resource is unhealthy
  (`updates` records both, in order: what the node advertised after each);
- GetPreferredAllocation (only when the options advertise it) and Allocate send exactly one
  container per call and check the answer: exactly one container response, preferred IDs a
  subset of the available ones, no duplicates, must-include IDs kept, at most the size asked;
- admit: a pod's devices chosen as the device manager chooses them, then Allocate;
- restart: stop serving, delete every non-directory file in the folder (its own socket and the
  plugins' sockets; the checkpoint file survives), then serve a new kubelet.sock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet._proto import api_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]
CHECKPOINT = "kubelet_internal_checkpoint"
SUPPORTED_VERSIONS = ("v1beta1",)
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


PRE_START_TIMEOUT_S = 30.0  # the kubelet's deadline for PreStartContainer


class KubeletError(Exception):
    """A plugin answer the real kubelet would reject."""


def is_extended_resource_name(name: str) -> bool:
    """As the kubelet's IsExtendedResourceName: domain-prefixed, outside kubernetes.io, and a
    valid qualified name also with the quota prefix "requests."."""
    if "/" not in name:
        return False
    prefix, short = name.split("/", 1)
    if prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io"):
        return False
    if not _DNS_SUBDOMAIN.match(prefix) or len(prefix) > 253:
        return False
    return bool(_QUALIFIED_NAME.match(short)) and len(f"requests.{name}") <= 253 + 63


@dataclass
class PluginEndpoint:
    resource: str
    endpoint: str
    options: pb.DevicePluginOptions
    channel: grpc.aio.Channel
    stub: pb_grpc.DevicePluginAsyncStub
    devices: dict[str, pb.Device] = field(default_factory=dict)
    updates: int = 0
    stream_task: asyncio.Task[None] | None = None
    connected: bool = True

    @property
    def healthy(self) -> list[str]:
        return [i for i, d in self.devices.items() if d.health == "Healthy" and self.connected]


@dataclass(frozen=True)
class Update:
    """One ListAndWatch message as the device manager applied it: what the node then advertises."""

    at: float
    resource: str
    capacity: int  # every device in the message
    allocatable: int  # the healthy ones


@dataclass
class Event:
    kind: str  # "serving" (kubelet.sock about to appear), "register", "rejected", "devices", "disconnected"
    resource: str
    at: float
    detail: str = ""


class FakeKubelet(pb_grpc.RegistrationServicer):
    """Resource handling: `start()` creates kubelet.sock, `stop()` closes every connection."""

    def __init__(self, folder: str, on_event: Callable[[Event], None] | None = None) -> None:
        """`on_event` sees every event as it is recorded (`nvdp testing fake-kubelet` prints them)."""
        self.folder = folder
        self._on_event = on_event
        self.socket_path = os.path.join(folder, "kubelet.sock")
        self.plugins: dict[str, PluginEndpoint] = {}
        self.events: list[Event] = []
        self.errors: list[str] = []  # protocol violations seen in plugin answers
        self.updates: list[Update] = []  # every ListAndWatch message and stream end, in order
        self.refuse_with: str | None = None  # make Register fail with this message
        self.register_delay: float = 0.0  # make Register hang this long
        self.allocated: dict[str, set[str]] = {}  # resource -> device IDs given to pods by admit()
        self._server: grpc.aio.Server | None = None
        self._changed = asyncio.Condition()

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        server = grpc.aio.server()
        pb_grpc.add_RegistrationServicer_to_server(self, server)
        self._record("serving", "", self.socket_path)  # before the socket file exists: restart timings start here
        server.add_insecure_port(f"unix://{self.socket_path}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=0)
        for plugin in list(self.plugins.values()):
            await self._disconnect(plugin)
        self.plugins.clear()

    async def restart(self) -> None:
        """As the kubelet restarting: clean the folder (CleanupPluginDirectory), serve again."""
        await self.stop()
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if name != CHECKPOINT and not os.path.isdir(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        await self.start()

    async def __aenter__(self) -> FakeKubelet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- Registration service -------------------------------------------------------------------

    async def Register(
        self, request: pb.RegisterRequest, context: Context
    ) -> pb.Empty:
        name = request.resource_name
        if self.register_delay:
            await asyncio.sleep(self.register_delay)
        problem = self._registration_problem(request)
        if problem is None and self.refuse_with:
            problem = self.refuse_with
        if problem is None:
            problem = await self._connect(request)
        async with self._changed:
            self._record("rejected" if problem else "register", name, problem or request.endpoint)
            self._changed.notify_all()
        if problem is not None:
            await context.abort(grpc.StatusCode.UNKNOWN, problem)
        return pb.Empty()

    def _registration_problem(self, request: pb.RegisterRequest) -> str | None:
        if request.version not in SUPPORTED_VERSIONS:
            return f"Unsupported version: {request.version!r}; supported: {', '.join(SUPPORTED_VERSIONS)}"
        if not is_extended_resource_name(request.resource_name):
            return f"invalid resource name: {request.resource_name!r} is not an extended resource"
        if not request.endpoint or "/" in request.endpoint:
            return f"invalid endpoint {request.endpoint!r}: must be a file name in {self.folder}"
        return None

    async def _connect(self, request: pb.RegisterRequest) -> str | None:
        path = os.path.join(self.folder, request.endpoint)
        channel = grpc.aio.insecure_channel(f"unix://{path}")
        stub = pb_grpc.DevicePluginStub(channel)
        try:
            options = await stub.GetDevicePluginOptions(pb.Empty(), timeout=5, wait_for_ready=False)
        except grpc.aio.AioRpcError as exc:
            await channel.close()
            return f"failed to dial device plugin at {path}: {exc.code().name}: {exc.details()}"
        old = self.plugins.get(request.resource_name)
        if old is not None:
            await self._disconnect(old)
        plugin = PluginEndpoint(request.resource_name, request.endpoint, options, channel, stub)
        self.plugins[request.resource_name] = plugin
        plugin.stream_task = asyncio.create_task(self._list_and_watch(plugin))
        return None

    async def _list_and_watch(self, plugin: PluginEndpoint) -> None:
        ended = "stream ended"
        try:
            async for response in plugin.stub.ListAndWatch(pb.Empty()):
                devices: dict[str, pb.Device] = {}
                for d in response.devices:
                    if d.health not in ("Healthy", "Unhealthy"):
                        self.errors.append(f"{plugin.resource}: device {d.ID} has health {d.health!r}")
                    devices[d.ID] = d
                async with self._changed:
                    plugin.devices = devices
                    plugin.updates += 1
                    self.updates.append(Update(time.monotonic(), plugin.resource, len(devices), len(plugin.healthy)))
                    self._changed.notify_all()
                self._record("devices", plugin.resource, f"{len(devices)} devices")
        except grpc.aio.AioRpcError as exc:
            ended = f"{exc.code().name}: {exc.details()}"  # e.g. RESOURCE_EXHAUSTED for a list over 4 MiB
        finally:
            async with self._changed:
                plugin.connected = False
                self.updates.append(Update(time.monotonic(), plugin.resource, len(plugin.devices), 0))
                self._changed.notify_all()
            self._record("disconnected", plugin.resource, ended)

    async def _disconnect(self, plugin: PluginEndpoint) -> None:
        if plugin.stream_task is not None:
            plugin.stream_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await plugin.stream_task
        await plugin.channel.close()

    def _record(self, kind: str, resource: str, detail: str = "") -> None:
        event = Event(kind, resource, time.monotonic(), detail)
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    # --- what the device manager does at pod admission ------------------------------------------

    def plugin(self, resource: str) -> PluginEndpoint:
        plugin = self.plugins.get(resource)
        if plugin is None:
            raise KubeletError(f"no plugin registered for {resource}")
        return plugin

    async def preferred_allocation(
        self, resource: str, available: Sequence[str], must_include: Sequence[str], size: int
    ) -> list[str]:
        plugin = self.plugin(resource)
        if not plugin.options.get_preferred_allocation_available:
            raise KubeletError(f"{resource} does not offer GetPreferredAllocation")
        request = pb.PreferredAllocationRequest(
            container_requests=[
                pb.ContainerPreferredAllocationRequest(
                    available_deviceIDs=list(available),
                    must_include_deviceIDs=list(must_include),
                    allocation_size=size,
                )
            ]
        )
        response = await plugin.stub.GetPreferredAllocation(request, timeout=10)
        if len(response.container_responses) != 1:
            raise KubeletError(f"{resource}: {len(response.container_responses)} container responses for 1")
        ids = list(response.container_responses[0].deviceIDs)
        problems = []
        if len(set(ids)) != len(ids):
            problems.append("duplicate IDs")
        if not set(ids) <= set(available):
            problems.append(f"IDs not available: {sorted(set(ids) - set(available))}")
        if ids and not set(must_include) <= set(ids):
            problems.append("must-include IDs missing")
        if len(ids) > size:
            problems.append(f"{len(ids)} IDs for size {size}")
        if problems:
            raise KubeletError(f"{resource}: bad preferred allocation {ids}: {'; '.join(problems)}")
        return ids

    async def refusal(self, resource: str, device_ids: Sequence[str]) -> str | None:
        """Allocate for one container and say why it was refused ("CODE: details"), None when it was not."""
        try:
            await self.allocate(resource, device_ids)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return None

    async def admit(self, resource: str, count: int) -> tuple[list[str], pb.ContainerAllocateResponse]:
        """Admit a pod asking for `count` devices, as the device manager does: choose among the
        healthy devices no admitted pod holds (GetPreferredAllocation when offered, the first free
        ones when its answer does not fit), then Allocate them; gRPC errors propagate."""
        plugin = self.plugin(resource)
        taken = self.allocated.setdefault(resource, set())
        free = [i for i in plugin.healthy if i not in taken]
        if len(free) < count:
            raise KubeletError(f"{resource}: {count} requested, {len(free)} allocatable")
        chosen = free[:count]
        if plugin.options.get_preferred_allocation_available:
            preferred = await self.preferred_allocation(resource, free, [], count)
            chosen = preferred if len(preferred) == count else chosen
        response = await self.allocate(resource, chosen)
        taken.update(chosen)
        return chosen, response

    async def allocate(self, resource: str, device_ids: Sequence[str]) -> pb.ContainerAllocateResponse:
        """Allocate for one container; gRPC errors propagate (grpc.aio.AioRpcError)."""
        plugin = self.plugin(resource)
        container = pb.ContainerAllocateRequest(devices_ids=list(device_ids))
        request = pb.AllocateRequest(container_requests=[container])
        response = await plugin.stub.Allocate(request, timeout=10)
        if len(response.container_responses) != 1:
            raise KubeletError(f"{resource}: {len(response.container_responses)} container responses for 1")
        return response.container_responses[0]

    async def pre_start(self, resource: str, device_ids: Sequence[str]) -> None:
        """PreStartContainer before a container start, as the kubelet calls it: only for a plugin
        that asked for it in its options, with the kubelet's 30 s deadline. gRPC errors propagate."""
        plugin = self.plugin(resource)
        if not plugin.options.pre_start_required:
            raise KubeletError(f"{resource} did not ask for PreStartContainer: the kubelet would not call it")
        await plugin.stub.PreStartContainer(pb.PreStartContainerRequest(devices_ids=list(device_ids)),
                                            timeout=PRE_START_TIMEOUT_S)

    async def start_refusal(self, resource: str, device_ids: Sequence[str]) -> str | None:
        """PreStartContainer for one container; why the start was refused ("CODE: details"), or None."""
        try:
            await self.pre_start(resource, device_ids)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return None

    # --- waiting for things (tests and the demo) -----------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    async def wait_registered(
        self, resource: str, timeout: float = 10.0, min_devices: int = 1
    ) -> PluginEndpoint:
        def ready() -> bool:
            p = self.plugins.get(resource)
            return p is not None and p.connected and len(p.devices) >= min_devices

        await self.wait_for(ready, timeout)
        return self.plugins[resource]
