"""2,000 Allocate calls from 16 concurrent clients, 4 extra ListAndWatch streams open, health flipping.

Health flips are real faults: transient XIDs injected into the simulated backend, through the
health monitor's event thread, policy and quiet period (20 ms here) back to Healthy.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import grpc
import pytest

from nvdp.app.plugin import Plugin
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.options import Config
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet._proto import api_pb2_grpc as pb_grpc
from nvdp.testing import WAIT_S, FakeKubelet, eventually
from tests.conftest import running_plugin
from tests.reliability.conftest import LogWatch

GPU = "nvidia.com/gpu"
CLIENTS = 16
CALLS = 2000
STREAMS = 4
TRANSIENT_XID = 94  # contained ECC error: Unhealthy, then Healthy after the quiet period
HEALTH = {"health_quiet_period": "0.02", "health_probe_interval": "0"}


@dataclass
class Outcomes:
    ok: int = 0
    refused_unhealthy: int = 0
    other: list[str] = field(default_factory=list)
    ever_unhealthy: set[str] = field(default_factory=set)


async def client(socket: str, ids: list[str], calls: int, seed: int, outcomes: Outcomes) -> None:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        stub = pb_grpc.DevicePluginStub(channel)
        for _ in range(calls):
            wanted = rng.sample(ids, rng.choice((1, 1, 2, 4)))
            request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=wanted)])
            try:
                response = await stub.Allocate(request, timeout=WAIT_S)
            except grpc.aio.AioRpcError as exc:
                named = [i for i in wanted if i in (exc.details() or "")]
                if (exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "unhealthy device" in (exc.details() or "")
                        and named and set(named) <= outcomes.ever_unhealthy):
                    outcomes.refused_unhealthy += 1
                else:
                    outcomes.other.append(f"{exc.code().name}: {exc.details()}")
                continue
            (container,) = response.container_responses
            if container.envs["NVIDIA_VISIBLE_DEVICES"].split(",") != wanted:
                outcomes.other.append(f"asked {wanted}, got {container.envs['NVIDIA_VISIBLE_DEVICES']}")
            else:
                outcomes.ok += 1


async def watch(socket: str, seen: list[list[tuple[str, str]]]) -> None:
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        async for response in pb_grpc.DevicePluginStub(channel).ListAndWatch(pb.Empty()):
            seen.append([(d.ID, d.health) for d in response.devices])


def ends_with(seen: list[list[tuple[str, str]]], final: list[tuple[str, str]]) -> bool:
    return bool(seen) and sorted(seen[-1]) == final


async def inject_faults(plugin: Plugin, ids: list[str], stop: asyncio.Event, outcomes: Outcomes) -> int:
    assert isinstance(plugin.backend, SimulatedBackend)
    rng = random.Random(7)
    injected = 0
    while not stop.is_set():
        gpu = rng.choice(ids)
        outcomes.ever_unhealthy.add(gpu)  # before the event reaches the monitor
        plugin.backend.inject_xid(gpu, TRANSIENT_XID)
        injected += 1
        await asyncio.sleep(rng.uniform(0.002, 0.02))  # the fault rate is part of the load, not a wait
    return injected


@pytest.mark.slow
async def test_concurrent_allocations_while_streaming_and_flipping_health(
    kubelet: FakeKubelet, make_config: Callable[..., Config], logs: LogWatch
) -> None:
    async with running_plugin(make_config("dgx-h100", **HEALTH)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
        ids = sorted(endpoint.devices)
        socket = plugin.manager.servers[GPU].socket_path
        seen: list[list[list[tuple[str, str]]]] = [[] for _ in range(STREAMS)]
        watchers = [asyncio.create_task(watch(socket, s)) for s in seen]
        outcomes, stop = Outcomes(), asyncio.Event()
        flipper = asyncio.create_task(inject_faults(plugin, ids, stop, outcomes))
        async with asyncio.timeout(120):
            await asyncio.gather(*(client(socket, ids, CALLS // CLIENTS, c, outcomes) for c in range(CLIENTS)))
        stop.set()
        flips = await flipper

        # Every stream and the kubelet end on the final state: all eight devices healthy again.
        final = [(i, "Healthy") for i in ids]
        for n, s in enumerate(seen):
            await eventually(partial(ends_with, s, final), f"watcher {n}'s last message: all healthy")
        await kubelet.wait_for(lambda: all(d.health == "Healthy" for d in endpoint.devices.values()), WAIT_S)
        assert endpoint.connected  # the kubelet's stream survived it all
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    assert outcomes.other == []
    assert outcomes.ok + outcomes.refused_unhealthy == CALLS  # nothing lost
    assert outcomes.ok > 0 and flips > 10
    assert all(len(message) == 8 for s in seen for message in s)  # always the full list
    # The faults really landed during the load: the watchers saw devices go Unhealthy.
    assert all(any(h == "Unhealthy" for message in s for _, h in message) for s in seen)
    assert kubelet.errors == []
    assert sum(e.kind == "register" for e in kubelet.events) == 1
