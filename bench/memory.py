"""Footprint: RSS of the plugin process, and Python heap traffic of one Allocate.

- RSS (VmRSS of the real child process) once registered with the device list held by the kubelet,
  and again after 10,000 Allocate calls from the fake kubelet (8 concurrent callers);
- tracemalloc, in-process: the Python heap an Allocate handler call needs at its peak, and what
  stays allocated per call after many calls (a leak shows up here first).
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from typing import Any

from bench.harness import Figure, Settings
from bench.rig import running_plugin, timed_calls
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.options import Config
from nvdp.core.resources import GPU_RESOURCE, build_tree
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet.server import ResourceServer, ServingContext
from nvdp.testing.process import memory_kib, rss_kib

RSS_GOAL_MB = 48.0  # the official plugin's RSS on one GPU
SETTLE_S = 0.5  # let the child finish start-up allocations before reading RSS


async def rss(settings: Settings) -> list[Figure]:
    allocations = settings.n(10_000, 2_000)
    registered, loaded, anonymous = [], [], []
    for _ in range(settings.n(3, 1)):
        async with running_plugin() as rig:
            await asyncio.sleep(SETTLE_S)
            registered.append(rss_kib(rig.plugin.pid) / 1024)
            anonymous.append(memory_kib(rig.plugin.pid)["RssAnon"] / 1024)
            ids = sorted(rig.kubelet.plugin(GPU_RESOURCE).devices)

            async def allocate(i: int, kubelet: Any = rig.kubelet, ids: list[str] = ids) -> object:
                return await kubelet.allocate(GPU_RESOURCE, [ids[i % len(ids)], ids[(i + 1) % len(ids)]])

            await timed_calls(allocate, allocations, 8)
            await asyncio.sleep(SETTLE_S)
            loaded.append(rss_kib(rig.plugin.pid) / 1024)
    growth = [(b - a) / a * 100 for a, b in zip(registered, loaded, strict=True)]
    return [
        Figure("RSS after registration", "MiB", registered, goal=RSS_GOAL_MB, goal_stat="max",
               note="VmRSS of the nvidia-device-plugin child, simulated dgx-h100"),
        Figure("RssAnon after registration (RSS less shared-library pages)", "MiB", anonymous),
        Figure(f"RSS after {allocations:,} Allocate calls", "MiB", loaded, goal=RSS_GOAL_MB, goal_stat="max"),
        Figure(f"RSS growth over {allocations:,} Allocate calls", "%", growth),
    ]


class _NoContext:
    """Allocate only touches its context to abort; these calls never do."""

    async def abort(self, code: object, details: str) -> None:
        raise AssertionError(f"unexpected abort: {details}")


async def python_heap(settings: Settings) -> list[Figure]:
    """The handler itself, called directly (no gRPC), so only the plugin's own work is counted."""
    backend = SimulatedBackend("dgx-h100")
    node = backend.discover()
    cfg = Config(simulate="dgx-h100")
    resource = build_tree(node, cfg)[GPU_RESOURCE]
    server = ResourceServer(resource, ServingContext(cfg, node.topology, node.control_devices), "/nonexistent")
    ids = [d.id for d in resource.devices]
    requests = [
        pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=[ids[i % 8], ids[(i + 1) % 8]])])
        for i in range(8)
    ]
    context: Any = _NoContext()
    calls = settings.n(10_000, 2_000)
    for i in range(200):  # warm caches (by_id, interned strings) before measuring
        await server.Allocate(requests[i % 8], context)

    gc.collect()
    tracemalloc.start()
    peaks = []
    for i in range(settings.n(500, 100)):
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        await server.Allocate(requests[i % 8], context)
        _, peak = tracemalloc.get_traced_memory()
        peaks.append(float(peak - before))
    gc.collect()
    start, _ = tracemalloc.get_traced_memory()
    blocks_before = sum(s.count for s in tracemalloc.take_snapshot().statistics("filename"))
    t0 = time.perf_counter()
    for i in range(calls):
        await server.Allocate(requests[i % 8], context)
    elapsed = time.perf_counter() - t0
    gc.collect()
    end, _ = tracemalloc.get_traced_memory()
    blocks_after = sum(s.count for s in tracemalloc.take_snapshot().statistics("filename"))
    tracemalloc.stop()
    backend.close()
    return [
        Figure("Python heap at peak during one Allocate handler call", "bytes", peaks,
               note="tracemalloc peak minus the traced memory before the call; 2 GPUs per request"),
        Figure(f"Python heap retained per Allocate call (over {calls:,} calls)", "bytes", [(end - start) / calls],
               extra={"blocks_retained_per_call": (blocks_after - blocks_before) / calls}),
        Figure("Allocate handler CPU time under tracemalloc", "us", [elapsed / calls * 1e6],
               note="for scale only: tracemalloc slows Python several-fold"),
    ]


async def run(settings: Settings) -> list[Figure]:
    return [*await rss(settings), *await python_heap(settings)]
