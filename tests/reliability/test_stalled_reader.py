"""A ListAndWatch client that stops reading must not wedge a stop, a reload, a kubelet restart or exit.

The client is a real child process (`nvdp.testing.process.StalledReader`) that reads the first
list and stops itself with SIGSTOP: its connection stays open, nothing reads it, and the server's
next list (8,000 time-slicing replicas, about 500 KB, against a 64 KiB flow-control window) blocks
in the write. grpc.aio's `server.stop(grace)` then never returns (the first test shows it without
nvdp); the resource server must stop within its deadline whatever the clients do.
"""

from __future__ import annotations

import asyncio
import os
import resource as rlimit
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from nvdp.backends.simulated.control import request
from nvdp.config.options import Config
from nvdp.core.devices import Device, Health, Node, Resource
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet._proto import api_pb2_grpc as pb_grpc
from nvdp.kubelet.server import STOP_DEADLINE_S, ResourceServer, ServingContext
from nvdp.testing import WAIT_S, FakeKubelet, eventually
from nvdp.testing.process import PluginProcess, StalledReader
from tests.reliability.conftest import LogWatch

GPU = "nvidia.com/gpu"
REPLICAS = 1000  # 8 GPUs x 1000: one list is ~500 KB, far over the reader's 64 KiB window
CONTEXT = ServingContext(Config(), Node(gpus=()).topology, ())
SLACK_S = 2.0  # a loaded machine may add scheduling delay to the deadline; a wedge adds forever


def big_resource(unhealthy: int = -1) -> Resource:
    devices = tuple(
        Device(f"GPU-{i:04d}-0000-0000-0000-000000000000::{r}", f"GPU-{i:04d}", str(i), (f"/dev/nvidia{i}",),
               health=Health.UNHEALTHY if r == unhealthy else Health.HEALTHY)
        for i in range(8) for r in range(REPLICAS)
    )
    return Resource(GPU, devices)


class CountingInterceptor(grpc.aio.ServerInterceptor):
    """Counts the ListAndWatch messages handed to gRPC, so a test knows a write is in flight."""

    def __init__(self) -> None:
        self.messages = 0

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_stream is None:
            return handler
        inner = handler.unary_stream

        async def counted(request: Any, context: Any) -> AsyncIterator[Any]:
            async for message in inner(request, context):
                self.messages += 1
                yield message

        return grpc.unary_stream_rpc_method_handler(
            counted, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


async def timed(action: Awaitable[None], limit_s: float) -> float:
    """Seconds `action` took; AssertionError when it has not returned after `limit_s`."""
    start = time.monotonic()
    task = asyncio.ensure_future(action)
    done, _ = await asyncio.wait({task}, timeout=limit_s)
    if not done:
        raise AssertionError(f"still not returned after {limit_s:g} s")
    task.result()
    return time.monotonic() - start


# --- grpc.aio itself -------------------------------------------------------------------------

async def stream_forever(request: pb.Empty, context: Any) -> AsyncIterator[pb.ListAndWatchResponse]:
    message = pb.ListAndWatchResponse(devices=[pb.Device(ID=d.id, health="Healthy") for d in big_resource().devices])
    while True:
        yield message


async def test_grpc_aio_stop_waits_for_a_reader_that_stopped_reading(plugin_dir: Path) -> None:
    """The behaviour worked around (grpcio 1.85): no nvdp code, just a server streaming to a
    paused client. If this starts failing, grpc fixed it and the forced close may go."""
    path = str(plugin_dir / "plain.sock")
    server = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(stream_forever, request_deserializer=pb.Empty.FromString,
                                                   response_serializer=pb.ListAndWatchResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("v1beta1.DevicePlugin",
                                                                         {"ListAndWatch": handler}),))
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    reader = StalledReader(path)
    await reader.start()
    stop = asyncio.ensure_future(server.stop(grace=0.5))
    try:
        done, _ = await asyncio.wait({stop}, timeout=0.5 + 1.5)
        assert not done, "grpc.aio stopped despite the paused reader"
    finally:
        await reader.kill()  # the connection closes with the process, and the stop completes
        await asyncio.wait_for(stop, WAIT_S)


# --- the resource server -----------------------------------------------------------------------

async def stalled_server(plugin_dir: Path) -> tuple[ResourceServer, CountingInterceptor, StalledReader]:
    counter = CountingInterceptor()
    server = ResourceServer(big_resource(), CONTEXT, str(plugin_dir), interceptors=(counter,))
    await server.start()
    reader = StalledReader(server.socket_path)
    await reader.start()
    await server.update(big_resource(unhealthy=0))  # the next list: its write blocks
    await eventually(lambda: counter.messages == 2, "the second list handed to gRPC")
    return server, counter, reader


@pytest.mark.parametrize("action", ["stop", "restart"])
async def test_stop_and_restart_return_while_a_reader_is_stalled(
    plugin_dir: Path, logs: LogWatch, action: str
) -> None:
    server, _, reader = await stalled_server(plugin_dir)
    try:
        took = await timed(getattr(server, action)(), STOP_DEADLINE_S + SLACK_S)
        print(f"{action} with a stalled reader took {took:.2f} s (deadline {STOP_DEADLINE_S:g} s)")
        if action == "restart":
            async with grpc.aio.insecure_channel(f"unix://{server.socket_path}") as channel:
                options = await pb_grpc.DevicePluginStub(channel).GetDevicePluginOptions(pb.Empty(), timeout=WAIT_S)
            assert options.get_preferred_allocation_available
        else:
            assert not os.path.exists(server.socket_path)
    finally:
        await reader.kill()
        await server.stop()


async def test_a_stalled_stream_holds_one_list_however_many_updates(plugin_dir: Path, logs: LogWatch) -> None:
    """Memory: the stalled stream never gets more than the list in flight (each stream sends the
    latest list only, and gRPC takes one write at a time), so 200 updates of a 500 KB list cost
    about nothing; buffering them would be ~100 MB."""
    server, counter, reader = await stalled_server(plugin_dir)
    try:
        before = rlimit.getrusage(rlimit.RUSAGE_SELF).ru_maxrss
        for i in range(200):
            await server.update(big_resource(unhealthy=i % REPLICAS))
            server.list_message()  # built as a stream would, so each version's list exists once
        grown_mib = (rlimit.getrusage(rlimit.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(f"peak RSS grew {grown_mib:.1f} MiB over 200 updates with a stalled stream")
        assert counter.messages == 2
        assert grown_mib < 40
    finally:
        await reader.kill()
        await server.stop()


async def test_the_forced_close_leaks_no_descriptor(plugin_dir: Path, logs: LogWatch) -> None:
    """It looks at every descriptor of the process; the chaos test found it leaking one per
    non-socket descriptor at each forced close, until "Too many open files"."""
    from nvdp import unix_sockets

    server, _, reader = await stalled_server(plugin_dir)
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            unix_sockets.close_connections(str(plugin_dir / "elsewhere.sock"))  # matches nothing
        assert len(os.listdir("/proc/self/fd")) == before
        assert unix_sockets.close_connections(server.socket_path) == 1  # the stalled reader's connection
        await server.stop()
    finally:
        await reader.kill()
        await server.stop()


# --- the real process --------------------------------------------------------------------------

def write_config(path: Path, rename: bool) -> None:
    path.write_text(
        f"version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: {str(rename).lower()}\n"
        f"    resources:\n    - name: {GPU}\n      replicas: {REPLICAS}\n"
    )


async def stall_the_plugin(kubelet: FakeKubelet, plugin_dir: Path) -> StalledReader:
    """A reader stalls on the GPU stream, then an XID makes the plugin send a new list to it."""
    await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8 * REPLICAS)
    reader = StalledReader(str(plugin_dir / "nvidia-gpu.sock"))
    await reader.start()
    control = str(plugin_dir / "control.sock")
    reply = await asyncio.to_thread(request, control, {"command": "xid", "gpu": 0, "xid": 79})
    assert reply["ok"], reply
    await kubelet.wait_for(lambda: len(kubelet.plugins[GPU].healthy) == 7 * REPLICAS, timeout=WAIT_S)
    return reader


Scenario = Callable[[PluginProcess, FakeKubelet, Path], Awaitable[None]]


async def kubelet_restart(plugin: PluginProcess, kubelet: FakeKubelet, plugin_dir: Path) -> None:
    await kubelet.restart()
    await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8 * REPLICAS)


async def sighup_renaming(plugin: PluginProcess, kubelet: FakeKubelet, plugin_dir: Path) -> None:
    write_config(plugin_dir / "config.yaml", rename=True)
    plugin.signal(signal.SIGHUP)
    await kubelet.wait_registered(f"{GPU}.shared", timeout=WAIT_S, min_devices=8 * REPLICAS)


async def sigterm(plugin: PluginProcess, kubelet: FakeKubelet, plugin_dir: Path) -> None:
    assert await plugin.stop(timeout=WAIT_S) == 0


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [kubelet_restart, sighup_renaming, sigterm],
                         ids=["kubelet restart", "SIGHUP renaming the resource", "SIGTERM"])
async def test_the_plugin_is_not_wedged_by_a_stalled_reader(
    kubelet: FakeKubelet, plugin_dir: Path, scenario: Scenario
) -> None:
    config = plugin_dir / "config.yaml"
    write_config(config, rename=False)
    args = ("--simulate", "dgx-h100", f"--config-file={config}", f"--simulate-control={plugin_dir}/control.sock")
    async with PluginProcess(str(plugin_dir), args) as plugin:
        reader = await stall_the_plugin(kubelet, plugin_dir)
        try:
            took = await timed(scenario(plugin, kubelet, plugin_dir), WAIT_S)
            print(f"{scenario.__name__} with a stalled reader took {took:.2f} s")
        finally:
            await reader.kill()
        assert "Traceback" not in plugin.log(), plugin.log()[-3000:]
