"""Manager races: a folder event, a reload and a registration all interleave on one loop."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from nvdp.config.options import Config
from nvdp.core.devices import Device, Node, Resource
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet.manager import Manager
from nvdp.kubelet.server import ServingContext

CONTEXT = ServingContext(Config(), Node(gpus=()).topology, ())


def resource(name: str, uuid: str) -> Resource:
    return Resource(name, (Device(uuid, uuid, "0", ("/dev/nvidia0",)),))


async def no_register(sock: str, name: str, endpoint: str, opts: pb.DevicePluginOptions) -> None:
    pass


async def test_a_reload_during_the_socket_check_does_not_break_it(plugin_dir: Path) -> None:
    manager = Manager(str(plugin_dir / "kubelet.sock"), CONTEXT, registrar=no_register)
    a, b, c = (resource(f"nvidia.com/{n}", f"GPU-{n}") for n in "abc")
    await manager.apply({a.name: a, b.name: b})
    for socket in os.listdir(plugin_dir):  # a kubelet restart deletes every socket
        os.unlink(plugin_dir / socket)
    try:
        check = asyncio.create_task(manager.check_sockets())
        await asyncio.sleep(0)  # one loop turn, not a wait: the check is now restarting the first server
        await manager.apply({a.name: a, b.name: b, c.name: c})  # a SIGHUP adds a resource meanwhile
        await check
        await manager.apply({a.name: a})  # and one that removes resources
        assert sorted(manager.servers) == [a.name]
        assert all(s.socket_alive() for s in manager.servers.values())
        assert sorted(os.listdir(plugin_dir)) == ["nvidia-a.sock"]
    finally:
        await manager.close()


async def test_a_resource_removed_while_registering_is_registered_again_when_back(plugin_dir: Path) -> None:
    (plugin_dir / "kubelet.sock").touch()
    calls: list[str] = []
    in_flight, answer, answered = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_register(sock: str, name: str, endpoint: str, opts: pb.DevicePluginOptions) -> None:
        calls.append(name)
        in_flight.set()
        await answer.wait()  # the kubelet answers when the test says so
        answered.set()

    manager = Manager(str(plugin_dir / "kubelet.sock"), CONTEXT, registrar=slow_register)
    gpu = resource("nvidia.com/gpu", "GPU-1")
    registering = asyncio.create_task(manager.keep_registered())
    try:
        await manager.apply({gpu.name: gpu})
        await in_flight.wait()
        await manager.apply({})  # the resource vanishes while its Register is in flight
        answer.set()
        # The manager handles the answer in the step in which the registrar returns (it calls it
        # directly, no task between), so by the time this test runs again it has been handled.
        await answered.wait()
        assert manager.registered == set()
        await manager.apply({gpu.name: gpu})  # and comes back: a new server, a new Register
        await manager.wait_registered(timeout=2)
        assert calls == [gpu.name, gpu.name]
    finally:
        registering.cancel()
        await manager.close()


async def test_a_socket_that_cannot_be_bound_is_retried_on_the_next_check(plugin_dir: Path) -> None:
    manager = Manager(str(plugin_dir / "kubelet.sock"), CONTEXT, registrar=no_register)
    gpu = resource("nvidia.com/gpu", "GPU-1")
    (plugin_dir / "nvidia-gpu.sock").mkdir()  # something we cannot remove sits on the socket path
    try:
        await manager.apply({gpu.name: gpu})  # a reload or rescan: logged, not raised
        assert list(manager.serve_failures) == [gpu.name]
        assert "nvidia-gpu.sock" in manager.serve_failures[gpu.name]
        await manager.check_sockets()  # still blocked: logged again (once), not raised
        (plugin_dir / "nvidia-gpu.sock").rmdir()
        await manager.check_sockets()  # the next folder event serves it
        assert manager.serve_failures == {} and manager.servers[gpu.name].socket_alive()
    finally:
        await manager.close()
