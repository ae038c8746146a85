"""Core latencies on the simulated dgx-h100 node, the plugin a child process, the fake kubelet here.

- exec of `nvidia-device-plugin` -> the kubelet holds the device list;
- kubelet restart -> registered again and device list received;
- Allocate and GetPreferredAllocation round trips, 1 and 8 concurrent callers;
- ListAndWatch fan-out: a device change reaching 1, 8 and 64 open streams.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import grpc

from bench.harness import Figure, Settings
from bench.rig import (
    DGX_GPUS,
    SIMULATED,
    START_TIMEOUT_S,
    ensure_bytecode,
    kubelet_folder,
    running_plugin,
    timed_calls,
    wait_event,
)
from nvdp.core.resources import GPU_RESOURCE
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet._proto import api_pb2_grpc as pb_grpc
from nvdp.testing.process import PluginProcess, console_script

STARTUP_GOAL_MS = 250.0
RESTART_GOAL_MS = 50.0
FANOUT_STREAMS = (1, 8, 64)


async def startup(settings: Settings) -> list[Figure]:
    """From just before the spawn to the fake kubelet receiving the first ListAndWatch message."""
    bytecode = ensure_bytecode()  # as installed in the image (bench/rig.py says why)
    to_devices, to_register = [], []
    for _ in range(settings.n(20, 5)):
        async with kubelet_folder() as (folder, kubelet), PluginProcess(folder, SIMULATED) as plugin:
            listed = await wait_event(kubelet, "devices", plugin.spawned_at, GPU_RESOURCE)
            registered = await wait_event(kubelet, "register", plugin.spawned_at, GPU_RESOURCE)
            to_devices.append((listed.at - plugin.spawned_at) * 1000)
            to_register.append((registered.at - plugin.spawned_at) * 1000)
    version_only = []
    for _ in range(settings.n(10, 3)):
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(console_script(), "--version", stdout=asyncio.subprocess.DEVNULL)
        await proc.wait()
        version_only.append((time.monotonic() - t0) * 1000)
    return [
        Figure("exec -> kubelet holds the device list", "ms", to_devices, goal=STARTUP_GOAL_MS,
               note="real console script, fresh interpreter each run", extra={"bytecode": bytecode}),
        Figure("exec -> Register received", "ms", to_register),
        Figure("exec -> exit of `nvidia-device-plugin --version`", "ms", version_only,
               note="interpreter start + CLI imports only: the floor under the start-up figure"),
    ]


async def kubelet_restart(settings: Settings) -> list[Figure]:
    """From just before the new kubelet.sock appears to the new device list at the kubelet."""
    to_devices, to_register = [], []
    async with running_plugin() as rig:
        for _ in range(settings.n(100, 20)):
            before = time.monotonic()
            await rig.kubelet.restart()
            serving = await wait_event(rig.kubelet, "serving", before)
            listed = await wait_event(rig.kubelet, "devices", serving.at, GPU_RESOURCE)
            registered = await wait_event(rig.kubelet, "register", serving.at, GPU_RESOURCE)
            to_devices.append((listed.at - serving.at) * 1000)
            to_register.append((registered.at - serving.at) * 1000)
    return [
        Figure("kubelet restart -> device list received", "ms", to_devices, goal=RESTART_GOAL_MS),
        Figure("kubelet restart -> registered again", "ms", to_register),
    ]


async def round_trips(settings: Settings) -> list[Figure]:
    figures = []
    async with running_plugin() as rig:
        kubelet = rig.kubelet
        ids = sorted(kubelet.plugin(GPU_RESOURCE).devices)

        async def allocate(i: int) -> object:
            return await kubelet.allocate(GPU_RESOURCE, [ids[i % len(ids)]])

        async def preferred(i: int) -> object:
            return await kubelet.preferred_allocation(GPU_RESOURCE, ids, [], 2)

        await timed_calls(allocate, 20, 1)  # warm up the channel and the server's code paths
        await timed_calls(preferred, 20, 1)
        for callers in (1, 8):
            calls = settings.n(2000, 200)
            figures.append(Figure(f"Allocate (1 GPU), {callers} concurrent caller(s)", "ms",
                                  await timed_calls(allocate, calls, callers)))
            figures.append(Figure(f"GetPreferredAllocation (2 of 8), {callers} concurrent caller(s)", "ms",
                                  await timed_calls(preferred, calls, callers)))
    return figures


class Streams:
    """N ListAndWatch streams, each on its own channel (as N separate watchers would be)."""

    def __init__(self, socket_path: str, count: int) -> None:
        self.channels = [grpc.aio.insecure_channel(f"unix://{socket_path}") for _ in range(count)]
        self.arrivals: list[list[float]] = [[] for _ in range(count)]
        self.changed = asyncio.Condition()
        self.tasks = [asyncio.create_task(self._read(i)) for i in range(count)]

    async def _read(self, i: int) -> None:
        stub = pb_grpc.DevicePluginStub(self.channels[i])
        async for _ in stub.ListAndWatch(pb.Empty()):
            async with self.changed:
                self.arrivals[i].append(time.monotonic())
                self.changed.notify_all()

    async def wait_messages(self, count: int, timeout: float = START_TIMEOUT_S) -> list[float]:
        """Wait until every stream got `count` messages; the arrival time of message `count` on each."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: all(len(a) >= count for a in self.arrivals))
        return [a[count - 1] for a in self.arrivals]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()


async def fan_out(settings: Settings) -> list[Figure]:
    """From just before the health change is commanded to the change arriving on every stream."""
    figures = []
    async with kubelet_folder() as (folder, kubelet):
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.flipper", os.path.join(folder, "kubelet.sock"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                assert await child.stdout.readline() == b"ready\n"
            await kubelet.wait_registered(GPU_RESOURCE, timeout=START_TIMEOUT_S, min_devices=DGX_GPUS)
            socket_path = os.path.join(folder, kubelet.plugin(GPU_RESOURCE).endpoint)
            for count in FANOUT_STREAMS:
                streams = Streams(socket_path, count)
                await streams.wait_messages(1)
                to_all, to_first = [], []
                for k in range(settings.n(50, 10)):
                    t0 = time.monotonic()
                    child.stdin.write(b"flip\n")
                    await child.stdin.drain()
                    arrivals = await streams.wait_messages(k + 2)
                    assert await child.stdout.readline() == b"flipped\n"
                    to_all.append((max(arrivals) - t0) * 1000)
                    to_first.append((min(arrivals) - t0) * 1000)
                await streams.close()
                figures.append(Figure(f"ListAndWatch fan-out: change -> all of {count} stream(s)", "ms", to_all,
                                      note="health flipped via Manager.apply in the plugin process"))
                if count > 1:
                    figures.append(Figure(f"ListAndWatch fan-out: change -> first of {count} streams", "ms", to_first))
        finally:
            child.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await child.wait()
            except TimeoutError:
                child.kill()
                await child.wait()
    return figures


async def run(settings: Settings) -> list[Figure]:
    return [
        *await startup(settings),
        *await kubelet_restart(settings),
        *await round_trips(settings),
        *await fan_out(settings),
    ]

