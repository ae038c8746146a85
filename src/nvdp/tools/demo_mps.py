"""`nvdp demo --sharing mps`: two GPUs of a simulated node shared with MPS, the others exclusive.

The real plugin and the real MPS control daemon (`mps-control-daemon`, in-process) run on a
simulated node, with the simulated `nvidia-cuda-mps-control` and `nvidia-smi`, against the fake
kubelet: the MPS resource is held back until its daemon answers, then a pod gets one replica
with the daemon's pipe and shared memory, and a request for two replicas is refused.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nvdp.app.discovery import discover_once
from nvdp.app.mps import NOT_CHECKED, MpsTiming
from nvdp.app.mps_daemon import ControlDaemon, DaemonTiming
from nvdp.app.plugin import Plugin
from nvdp.config.load import load
from nvdp.core import mps
from nvdp.core.resources import GPU_RESOURCE
from nvdp.testing import FakeKubelet
from nvdp.testing.mps import SimulatedMps

Say = Callable[[str], None]
SHARED = "nvidia.com/gpu.shared"
REPLICAS = 4
# Quicker than the defaults, so that the demo takes seconds.
DEMO_MPS_TIMING = MpsTiming(first_s=0.2, max_s=1.0, recheck_s=0.5)
DEMO_DAEMON_TIMING = DaemonTiming(first_s=0.2, max_s=1.0, check_s=0.5)


def config_text(shared: list[int]) -> str:
    return (f"version: v1\nsharing:\n  mps:\n    resources:\n    - name: {GPU_RESOURCE}\n      replicas: {REPLICAS}\n"
            f"      devices: [{', '.join(str(i) for i in shared)}]\n      rename: {SHARED}\n")


async def run_mps_demo(profile: str, say: Say) -> None:
    with tempfile.TemporaryDirectory(prefix="nvdp-demo-") as folder:
        sim = SimulatedMps(Path(folder))
        node, _ = discover_once(load({"simulate": profile}, {}))
        shared = [g.index for g in node.gpus][-2:]
        (Path(folder) / "config.yaml").write_text(config_text(shared))
        cfg = load({"simulate": profile, "kubelet_socket": f"{folder}/kubelet.sock",
                    "config_file": f"{folder}/config.yaml", **sim.settings()}, {})
        say(f"== nvdp demo --sharing mps: simulated node '{profile}', GPUs {shared} shared with MPS "
            f"({REPLICAS} replicas each, as {SHARED}), the others exclusive as {GPU_RESOURCE}")
        say("config file:\n" + "\n".join("    " + line for line in config_text(shared).splitlines()))
        async with FakeKubelet(folder) as kubelet:
            plugin = Plugin(cfg, mps_timing=DEMO_MPS_TIMING)
            task = asyncio.create_task(plugin.run())
            try:
                await _story(plugin, kubelet, sim, say)
            finally:
                plugin.stop()
                await task
                sim.kill_daemons()  # only if the story stopped half-way
        say("== plugin and MPS daemon stopped; demo done")


async def _story(plugin: Plugin, kubelet: FakeKubelet, sim: SimulatedMps, say: Say) -> None:
    exclusive = await kubelet.wait_registered(GPU_RESOURCE)
    say(f"kubelet: {GPU_RESOURCE} registered with {len(exclusive.devices)} exclusive GPUs")
    await plugin.started.wait()
    while plugin.mps.status.get(SHARED, "") in ("", NOT_CHECKED):
        await asyncio.sleep(0.05)
    say(f"plugin: {SHARED} held back, not registered: {plugin.mps.status[SHARED]}")

    daemon = ControlDaemon(plugin.cfg, timing=DEMO_DAEMON_TIMING)
    started = time.monotonic()
    daemon_task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.ready.wait(), 60)
        say(f"mps-control-daemon: started in {time.monotonic() - started:.1f} s; compute modes "
            + ", ".join(f"{u[:12]}…={m}" for u, m in sim.compute_modes().items()))
        told = [c for c in sim.state(SHARED)["commands"] if c != mps.READINESS_COMMAND]
        say("mps-control-daemon: told the daemon: " + "; ".join(told))
        endpoint = await kubelet.wait_registered(SHARED, timeout=30, min_devices=1)
        say(f"kubelet: {SHARED} registered {time.monotonic() - started:.1f} s after the daemon was started, "
            f"{len(endpoint.devices)} replicas: {', '.join(list(endpoint.devices)[:2])}, ...")

        chosen = await kubelet.preferred_allocation(SHARED, endpoint.healthy, [], 1)
        response = await kubelet.allocate(SHARED, chosen)
        say(f"kubelet: pod asking for 1 {SHARED} admitted with {chosen[0]}:")
        say("    envs   " + ", ".join(f"{k}={v}" for k, v in sorted(response.envs.items())))
        for m in response.mounts:
            say(f"    mount  {m.host_path} -> {m.container_path}")
        two = await kubelet.refusal(SHARED, list(endpoint.devices)[:2])
        say(f"kubelet: pod asking for 2 replicas -> {two or 'unexpectedly admitted'}")
    finally:
        daemon.stop()
        await daemon_task
    say("mps-control-daemon: stopped (quit sent, compute modes "
        + ", ".join(sorted(set(sim.compute_modes().values()))) + ")")
    await kubelet.wait_for(lambda: not kubelet.plugin(SHARED).connected, timeout=30)
    say(f"plugin: the daemon no longer answers, so {SHARED} is no longer served "
        f"({plugin.mps.status.get(SHARED, '')[:80]}...)")
