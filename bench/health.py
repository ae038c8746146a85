"""Health latency on the simulated dgx-h100 node: an injected fault -> the kubelet's ListAndWatch view.

- in-process: `SimulatedBackend.inject_xid` from the benchmark's loop; the event goes through the
  real path (event thread -> call_soon_threadsafe -> policy -> new tree -> every stream);
- child process: `nvidia-device-plugin` in its own interpreter, the XID sent through its
  `--simulate-control` socket (the time includes that request);
- recovery overshoot: how long after the quiet period a transient XID's device is Healthy again
  at the kubelet (the recovery probe runs on a timer at the deadline, not on a polling interval).

Quiet period 50 ms so GPUs come back between rounds; periodic probes off (recovery probes only).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from bench.harness import Figure, Settings
from nvdp.app.plugin import Plugin
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.load import load
from nvdp.core.resources import GPU_RESOURCE
from nvdp.ops import logs
from nvdp.testing import FakeKubelet
from nvdp.testing.fake_kubelet import PluginEndpoint

GOAL_MS = 50.0
QUIET_S = 0.05
HEALTH_FLAGS = {"health_quiet_period": str(QUIET_S), "health_probe_interval": "0"}
TRANSIENT_XID = 94
START_TIMEOUT_S = 60.0


def _shows(endpoint: PluginEndpoint, device: str, health: str) -> Callable[[], bool]:
    return lambda: endpoint.devices[device].health == health


async def _mark_rounds(
    kubelet: FakeKubelet, endpoint: PluginEndpoint, gpus: list[str], rounds: int, inject: Callable[[int], object]
) -> list[float]:
    """Per round: the next GPU (round-robin, waiting until it is Healthy again), inject a transient
    XID, time until the kubelet's copy of the list shows it Unhealthy."""
    latencies = []
    for i in range(rounds):
        gpu = gpus[i % len(gpus)]
        await kubelet.wait_for(_shows(endpoint, gpu, "Healthy"), timeout=10)
        t0 = time.perf_counter()
        result = inject(i % len(gpus))
        if asyncio.iscoroutine(result):
            await result
        await kubelet.wait_for(_shows(endpoint, gpu, "Unhealthy"), timeout=10)
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


@asynccontextmanager
async def _in_process() -> AsyncIterator[tuple[FakeKubelet, PluginEndpoint, Plugin]]:
    with tempfile.TemporaryDirectory(prefix="nvdp-bench-") as folder:
        cfg = load({"simulate": "dgx-h100", "kubelet_socket": f"{folder}/kubelet.sock", **HEALTH_FLAGS}, {})
        async with FakeKubelet(folder) as kubelet:
            plugin = Plugin(cfg)
            task = asyncio.create_task(plugin.run())
            try:
                endpoint = await kubelet.wait_registered(GPU_RESOURCE, timeout=START_TIMEOUT_S, min_devices=8)
                yield kubelet, endpoint, plugin
            finally:
                plugin.stop()
                await task


async def in_process(settings: Settings) -> list[Figure]:
    rounds = settings.n(2000, 200)
    async with _in_process() as (kubelet, endpoint, plugin):
        assert isinstance(plugin.backend, SimulatedBackend)
        backend = plugin.backend
        gpus = list(endpoint.devices)
        mark = await _mark_rounds(kubelet, endpoint, gpus, rounds, lambda g: backend.inject_xid(g, TRANSIENT_XID))
        overshoot = []
        for i in range(settings.n(200, 30)):
            gpu = gpus[i % len(gpus)]
            await kubelet.wait_for(_shows(endpoint, gpu, "Healthy"), timeout=10)
            t0 = time.perf_counter()
            backend.inject_xid(i % len(gpus), TRANSIENT_XID)
            await kubelet.wait_for(_shows(endpoint, gpu, "Unhealthy"), timeout=10)
            await kubelet.wait_for(_shows(endpoint, gpu, "Healthy"), timeout=10)
            overshoot.append((time.perf_counter() - t0 - QUIET_S) * 1000)
        streams = len(plugin.manager.servers)
    return [
        Figure("XID (in-process API) -> kubelet sees Unhealthy", "ms", mark, goal=GOAL_MS, goal_stat="p99",
               note=f"dgx-h100, 8 GPUs round-robin, {streams} resource stream(s)"),
        Figure("transient XID: Healthy at the kubelet after the quiet period", "ms", overshoot,
               note=f"time from injection to Healthy minus the {QUIET_S * 1000:.0f} ms quiet period"),
    ]


async def child_process(settings: Settings) -> list[Figure]:
    rounds = settings.n(1000, 100)
    with tempfile.TemporaryDirectory(prefix="nvdp-bench-") as folder:
        control = f"{folder}/control.sock"
        args = ["--simulate", "dgx-h100", "--kubelet-socket", f"{folder}/kubelet.sock", "--simulate-control",
                control, "--health-quiet-period", str(QUIET_S), "--health-probe-interval", "0", "--log-level", "error"]
        async with FakeKubelet(folder) as kubelet:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "nvdp", "serve", *args, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                endpoint = await kubelet.wait_registered(GPU_RESOURCE, timeout=START_TIMEOUT_S, min_devices=8)
                while not os.path.exists(control):
                    await asyncio.sleep(0.01)
                reader, writer = await asyncio.open_unix_connection(control)

                async def inject(gpu: int) -> None:
                    writer.write(json.dumps({"command": "xid", "gpu": gpu, "xid": TRANSIENT_XID}).encode() + b"\n")
                    await writer.drain()
                    reply = json.loads(await reader.readline())
                    assert reply["ok"], reply

                mark = await _mark_rounds(kubelet, endpoint, list(endpoint.devices), rounds, inject)
                writer.close()
            finally:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 30)
    return [
        Figure("XID (control socket, plugin in its own process) -> kubelet sees Unhealthy", "ms", mark,
               goal=GOAL_MS, goal_stat="p99", note="includes the control-socket request; dgx-h100, 8 GPUs"),
    ]


async def run(settings: Settings) -> list[Figure]:
    # The plugin logs every transition, as in production; the lines go nowhere here.
    with open(os.devnull, "w") as sink:
        logs.setup("info", stream=sink)
        return await in_process(settings) + await child_process(settings)
