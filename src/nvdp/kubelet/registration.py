"""The kubelet edge: Register over kubelet.sock, and noticing when the kubelet restarts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc

from nvdp import unix_sockets
from nvdp.errors import RegistrationError
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet._proto import api_pb2_grpc as pb_grpc

log = logging.getLogger("nvdp.kubelet")  # stable name: operators filter on it

API_VERSION = "v1beta1"
REGISTER_TIMEOUT_S = 5.0


async def register(
    kubelet_socket: str,
    resource_name: str,
    endpoint: str,
    options: pb.DevicePluginOptions,
    timeout: float = REGISTER_TIMEOUT_S,
) -> None:
    """Register one resource; raises RegistrationError when the kubelet is absent or refuses."""
    try:
        what = unix_sockets.kind(kubelet_socket)
    except OSError as exc:
        raise RegistrationError(f"cannot check kubelet socket {kubelet_socket}: {exc.strerror or exc}") from exc
    if what is None:
        raise RegistrationError(f"kubelet socket {kubelet_socket} does not exist")
    if what != "a socket":  # dialling a file or a folder would only time out, saying nothing useful
        raise RegistrationError(f"kubelet socket {kubelet_socket} is {what}, not a socket (is --kubelet-socket right?)")
    request = pb.RegisterRequest(
        version=API_VERSION, endpoint=endpoint, resource_name=resource_name, options=options
    )
    try:
        async with grpc.aio.insecure_channel(f"unix://{kubelet_socket}") as channel:
            await pb_grpc.RegistrationStub(channel).Register(request, timeout=timeout, wait_for_ready=True)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # hung, or a dead kubelet's socket file
            raise RegistrationError(
                f"kubelet at {kubelet_socket} did not answer Register for {resource_name} within {timeout:g} s"
            ) from exc
        raise RegistrationError(
            f"kubelet at {kubelet_socket} refused {resource_name}: {exc.code().name}: {exc.details()}"
        ) from exc


async def kubelet_answers(kubelet_socket: str, timeout: float) -> bool:
    """Whether a gRPC server accepts connections on the kubelet socket within `timeout` (doctor)."""
    try:
        async with grpc.aio.insecure_channel(f"unix://{kubelet_socket}") as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout)
    except TimeoutError:
        return False
    return True


class FolderWatch:
    """Wake-ups whenever a file is created or deleted in `folder` (the kubelet's restart signal),
    and the names created since the last look.

    inotify gives sub-millisecond notice; a slow poll backs it up for the cases inotify misses
    (the folder itself deleted and re-created). Consumers re-check the state on every wake-up, so
    a spurious one is harmless. `created()` returns the names created (or moved in) since it was
    last called, reading the pending events first, so a caller that looks just before dialling
    the kubelet knows which kubelet.sock creations happened before that moment. A queue overflow
    (events lost) counts as every name created (`OVERFLOW` is in the answer).

    Resource handling: open on entering `changes()`, closed when the iteration ends.
    """

    OVERFLOW = "*"

    def __init__(self, folder: str, poll_interval: float = 1.0) -> None:
        self.folder = folder
        self.poll_interval = poll_interval
        self._inotify: Any = None
        self._created: list[str] = []
        self._woken = asyncio.Event()

    def created(self) -> list[str]:
        self._read()
        names, self._created = self._created, []
        return names

    def _read(self) -> None:
        if self._inotify is None:
            return
        from inotify_simple import flags

        for event in self._inotify.read(timeout=0):
            self._woken.set()  # whoever read it, the consumer re-checks the folder
            if event.mask & flags.Q_OVERFLOW:
                self._created.append(self.OVERFLOW)
            elif event.mask & (flags.CREATE | flags.MOVED_TO):
                self._created.append(event.name)

    def _on_readable(self) -> None:
        self._read()
        self._woken.set()

    def _ensure_watch(self) -> None:
        from inotify_simple import flags

        if os.path.isdir(self.folder):
            with contextlib.suppress(OSError):
                self._inotify.add_watch(self.folder, flags.CREATE | flags.DELETE | flags.MOVED_TO | flags.DELETE_SELF)

    async def changes(self) -> AsyncIterator[None]:
        from inotify_simple import INotify

        loop = asyncio.get_running_loop()
        self._inotify = INotify()
        self._ensure_watch()
        loop.add_reader(self._inotify.fileno(), self._on_readable)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):
                        await self._woken.wait()
                self._woken.clear()
                self._ensure_watch()  # re-arms after the folder was removed and created again
                yield
        finally:
            loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None
