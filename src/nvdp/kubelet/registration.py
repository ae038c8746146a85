"""The kubelet edge: Register over kubelet.sock, and noticing when the kubelet restarts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

import grpc

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
    if not os.path.exists(kubelet_socket):
        raise RegistrationError(f"kubelet socket {kubelet_socket} does not exist")
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


async def folder_changes(folder: str, poll_interval: float = 1.0) -> AsyncIterator[None]:
    """Yield whenever a file is created or deleted in `folder` (the kubelet's restart signal).

    inotify gives sub-millisecond notice; a slow poll backs it up for the cases inotify misses
    (the folder itself deleted and re-created). Consumers re-check the state on every yield, so a
    spurious wake-up is harmless.
    """
    from inotify_simple import INotify, flags

    loop = asyncio.get_running_loop()
    woken = asyncio.Event()
    inotify = INotify()
    watch: int | None = None
    mask = flags.CREATE | flags.DELETE | flags.MOVED_TO | flags.DELETE_SELF

    def on_readable() -> None:
        for _event in inotify.read(timeout=0):
            pass
        woken.set()

    def ensure_watch() -> None:
        nonlocal watch
        if os.path.isdir(folder):
            with contextlib.suppress(OSError):
                watch = inotify.add_watch(folder, mask)

    ensure_watch()
    loop.add_reader(inotify.fileno(), on_readable)
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_interval):
                    await woken.wait()
            woken.clear()
            ensure_watch()  # re-arms after the folder was removed and created again
            yield
    finally:
        loop.remove_reader(inotify.fileno())
        inotify.close()
