"""The health part of `nvdp demo`: a fatal XID, a transient XID that recovers, and a GPU reset,
injected into the simulated node and watched from the fake kubelet's side."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from nvdp.app.plugin import Plugin
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.core.resources import GPU_RESOURCE
from nvdp.testing import FakeKubelet

Say = Callable[[str], None]
Until = Callable[[str, str], Awaitable[float]]
# The demo shortens the quiet period so recovery shows in seconds (the default is 60 s).
DEMO_QUIET_PERIOD_S = 2.0
DEMO_PROBE_INTERVAL_S = 0.25
DEMO_SETTINGS = {"health_quiet_period": str(DEMO_QUIET_PERIOD_S), "health_probe_interval": str(DEMO_PROBE_INTERVAL_S)}


async def health_story(plugin: Plugin, kubelet: FakeKubelet, say: Say) -> None:
    backend, node = plugin.backend, plugin.node
    if not isinstance(backend, SimulatedBackend) or node is None:
        return
    endpoint = kubelet.plugin(GPU_RESOURCE)
    gpus = [g.uuid for g in node.gpus]
    fatal = min(3, len(gpus) - 1)
    transient = min(5, len(gpus) - 1) if len(gpus) > 1 else fatal

    async def until(device: str, health: str, timeout: float = 15.0) -> float:
        start = time.monotonic()
        await kubelet.wait_for(lambda: endpoint.devices[device].health == health, timeout)
        return time.monotonic() - start

    def reason(device: str) -> str:
        return plugin.manager.tree[GPU_RESOURCE].by_id[device].reason

    say(f"== health: faults injected into the simulated node (quiet period {DEMO_QUIET_PERIOD_S:g} s for the "
        f"demo; the default is 60 s)")
    started = time.monotonic()
    backend.inject_xid(fatal, 79)
    await until(gpus[fatal], "Unhealthy")
    say(f"inject XID 79 on GPU {fatal} -> kubelet sees it Unhealthy after "
        f"{(time.monotonic() - started) * 1000:.1f} ms ({reason(gpus[fatal])})")

    if len(gpus) > 1:
        size = min(4, len(gpus) - 1)
        chosen = await kubelet.preferred_allocation(GPU_RESOURCE, gpus, [], size)
        say(f"kubelet: {len(endpoint.healthy)} of {len(gpus)} GPUs allocatable; GetPreferredAllocation(size={size}) "
            f"-> GPUs {', '.join(str(gpus.index(c)) for c in chosen)} (the lost GPU blocks nothing)")
        refused = await kubelet.refusal(GPU_RESOURCE, [gpus[fatal]])
        say(f"kubelet: Allocate(GPU {fatal}) -> {refused or 'unexpectedly succeeded'}")
    else:
        await _reset(plugin, backend, fatal, until, say)

    started = time.monotonic()
    backend.inject_xid(transient, 94)
    await until(gpus[transient], "Unhealthy")
    say(f"inject XID 94 on GPU {transient} -> Unhealthy after {(time.monotonic() - started) * 1000:.1f} ms "
        f"({reason(gpus[transient])})")
    await until(gpus[transient], "Healthy")
    say(f"GPU {transient} Healthy again {time.monotonic() - started:.2f} s after its XID "
        f"(no new event for the quiet period, and a passing NVML probe)")
    if len(gpus) > 1:
        say(f"GPU {fatal} is still {endpoint.devices[gpus[fatal]].health} (XID 79 is fatal: it waits for a reset)")
        await _reset(plugin, backend, fatal, until, say)


async def _reset(plugin: Plugin, backend: SimulatedBackend, gpu: int, until: Until, say: Say) -> None:
    uuid = backend.node.gpus[gpu].uuid
    started = time.monotonic()
    backend.lose(gpu)
    while not (sample := plugin.health.state.samples.get(uuid)) or sample.reachable:
        await asyncio.sleep(0.01)  # until a probe has seen it gone
    backend.restore(gpu)
    await until(uuid, "Healthy")
    say(f"reset GPU {gpu} (simulated: it drops off the bus and comes back) -> Healthy again after "
        f"{time.monotonic() - started:.2f} s")
