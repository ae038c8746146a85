"""The figures of issue 14, beside the official plugin v0.20.0 measured on the same machine kind.

The official plugin's figures come from the issue (one run, 2 cores, 8 simulated H100s behind a
fake libnvidia-ml, driven by the kubelet's own device-manager code); here the plugin runs its
real NVML code path on the test fake (`bench/nvml_plugin.py`, 8 x H200) and is driven by the
fake kubelet, whose client is Python (grpc.aio) rather than Go: its own CPU time per call is
measured too, because it is part of every round trip below.

- exec -> registered (the fake kubelet holds the device list), NVML path and the simulated
  console script, with bytecode compiled as in the image (`rig.ensure_bytecode`);
- RSS (VmRSS) after registration on the NVML path; Pss, RssAnon and threads beside it;
- Allocate (1 GPU) through the fake kubelet's client, 1 caller: p50 and p99;
- pod admission as the kubelet does it: GetPreferredAllocation (2 of 8) + Allocate + the
  checkpoint file written (temp file, fsync, rename);
- CPU per Allocate in the plugin process and in the client (from /proc/<pid>/task/*/schedstat).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from bench.harness import Figure, Settings
from bench.rig import DGX_GPUS, SIMULATED, START_TIMEOUT_S, ensure_bytecode, kubelet_folder, timed_calls, wait_event
from nvdp.core.resources import GPU_RESOURCE
from nvdp.testing import FakeKubelet
from nvdp.testing.process import PluginProcess, memory_kib

ROOT = Path(__file__).parents[1]
NVML_PATH = (sys.executable, "-m", "bench.nvml_plugin")
OFFICIAL = {  # the side-by-side run of the official plugin v0.20.0
    "allocate_p50_us": (210, 224), "admission_p50_ms": (2.5, 3.0), "rss_mb": (27.3, 28.6),
}
ALLOCATE_GOAL_MS = 0.33  # <= 1.5 x the official 210-224 us
ADMISSION_GOAL_MS = 1.0  # <= 0.4 x the official 2.5-3.0 ms
RSS_GOAL_MB = 34.0  # <= 1.25 x the official 27.3 MB
STARTUP_GOAL_MS = 200.0
SETTLE_S = 0.5


def nvml_plugin(folder: str) -> PluginProcess:
    return PluginProcess(folder, (), env={"PYTHONPATH": str(ROOT)}, command=NVML_PATH)


def thread_cpu_ns(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError):  # a thread that just ended
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


async def startup(settings: Settings) -> list[Figure]:
    figures = []
    for label, make in (("NVML path, test fake", nvml_plugin),
                        ("simulated dgx-h100, console script", lambda f: PluginProcess(f, SIMULATED))):
        samples = []
        for _ in range(settings.n(15, 3)):
            async with kubelet_folder() as (folder, kubelet), make(folder) as plugin:
                listed = await wait_event(kubelet, "devices", plugin.spawned_at, GPU_RESOURCE)
                samples.append((listed.at - plugin.spawned_at) * 1000)
        figures.append(Figure(f"exec -> registered, device list held ({label})", "ms", samples,
                              goal=STARTUP_GOAL_MS, note="bytecode compiled, as installed in the image"))
    return figures


def checkpoint(folder: str, kubelet: FakeKubelet, pod: int, ids: list[str]) -> None:
    """What the kubelet's device manager writes after an allocation (its file store: temp, fsync, rename)."""
    data = {"Data": {"PodDeviceEntries": [{"PodUID": f"pod-{pod}", "ContainerName": "main",
                                           "ResourceName": GPU_RESOURCE, "DeviceIDs": {"-1": ids},
                                           "AllocResp": ""}],
                     "RegisteredDevices": {GPU_RESOURCE: sorted(kubelet.plugin(GPU_RESOURCE).devices)}},
            "Checksum": pod}
    path = os.path.join(folder, "kubelet_internal_checkpoint")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


async def serving(settings: Settings) -> list[Figure]:
    rss, pss, anon, threads, allocate, admission, preferred, writes, server_cpu, client_cpu = ([] for _ in range(10))
    for _ in range(settings.n(3, 1)):
        async with kubelet_folder() as (folder, kubelet), nvml_plugin(folder) as plugin:
            endpoint = await kubelet.wait_registered(GPU_RESOURCE, timeout=START_TIMEOUT_S, min_devices=DGX_GPUS)
            await asyncio.sleep(SETTLE_S)
            status = memory_kib(plugin.pid)
            rss.append(status["VmRSS"] / 1024)
            anon.append(status["RssAnon"] / 1024)
            pss.append(pss_kib(plugin.pid) / 1024)
            threads.append(float(len(os.listdir(f"/proc/{plugin.pid}/task"))))
            ids = sorted(endpoint.devices)

            async def one(i: int, kubelet: FakeKubelet = kubelet, ids: list[str] = ids) -> object:
                return await kubelet.allocate(GPU_RESOURCE, [ids[i % len(ids)]])

            await timed_calls(one, 200, 1)  # warm up
            calls = settings.n(2000, 300)
            server0, client0 = thread_cpu_ns(plugin.pid), thread_cpu_ns(os.getpid())
            allocate += await timed_calls(one, calls, 1)
            server_cpu.append((thread_cpu_ns(plugin.pid) - server0) / calls / 1000)
            client_cpu.append((thread_cpu_ns(os.getpid()) - client0) / calls / 1000)

            for pod in range(settings.n(300, 50)):
                t0 = time.perf_counter()
                chosen = await kubelet.preferred_allocation(GPU_RESOURCE, ids, [], 2)
                preferred.append((time.perf_counter() - t0) * 1000)
                await kubelet.allocate(GPU_RESOURCE, chosen)
                t1 = time.perf_counter()
                checkpoint(folder, kubelet, pod, chosen)
                t2 = time.perf_counter()
                admission.append((t2 - t0) * 1000)
                writes.append((t2 - t1) * 1000)
    official = ", ".join(f"{k} {a}-{b}" for k, (a, b) in OFFICIAL.items())
    return [
        Figure("RSS after registration (NVML path, test fake)", "MiB", rss, goal=RSS_GOAL_MB / 1.048576,
               goal_stat="max", note=f"VmRSS; goal 34 MB = 32.4 MiB; official: {official}"),
        Figure("Pss after registration (NVML path)", "MiB", pss, note="shared-library pages split among their users"),
        Figure("RssAnon after registration (NVML path)", "MiB", anon),
        Figure("threads after registration (NVML path)", "threads", threads),
        Figure("Allocate (1 GPU) through the fake kubelet's client (NVML path)", "ms", allocate,
               goal=ALLOCATE_GOAL_MS, note="1 caller; the client is Python grpc.aio, see the client CPU figure"),
        Figure("pod admission: GetPreferredAllocation + Allocate + checkpoint (NVML path)", "ms", admission,
               goal=ADMISSION_GOAL_MS, note="2 of 8 GPUs; checkpoint written as the kubelet does (fsync)"),
        Figure("  of which GetPreferredAllocation", "ms", preferred),
        Figure("  of which the checkpoint write (fsync)", "ms", writes),
        Figure("plugin CPU per Allocate (all threads)", "us", server_cpu),
        Figure("fake kubelet's client CPU per Allocate (all threads)", "us", client_cpu,
               note="the Go kubelet's client costs far less; part of the Allocate round trip above"),
    ]


async def run(settings: Settings) -> list[Figure]:
    bytecode = ensure_bytecode()
    figures = [*await startup(settings), *await serving(settings)]
    for f in figures:
        f.extra.setdefault("bytecode", bytecode)
    return figures
