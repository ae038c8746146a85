"""GetPreferredAllocation for whole GPUs: time per call and exactness, per profile and size.

Each call goes through `allocation.preferred`, the function the gRPC server calls, with a random
free set (as the kubelet offers: the GPUs not in use, in no particular order) and sometimes a
must-include GPU. The first sample of every size is the first call after discovery (tables built
by `allocation.prepare`, as the plugin does at discovery); the discovery cost and a call made
before any table exists ("cold", which the plugin never makes) are reported without a goal.
Quality: score / brute-force optimum, which must be 1.0.

Goals: p99 <= 1 ms per call up to 8 GPUs, <= 20 ms on 16 GPUs (issue 5).
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Sequence

from bench.harness import Figure, Settings, summarize
from bench.workload import Scene
from nvdp.core import allocation
from nvdp.core.scoring import masks_of_size, pair_score

PROFILES = ("pcie-l40s", "dgx1-v100", "dgx-h100", "dgx2-v100")


def goal_ms(gpus: int) -> float:
    return 1.0 if gpus <= 8 else 20.0


def reference_best(scene: Scene, free: Sequence[str], must: Sequence[str], size: int) -> int:
    """The optimum by enumeration over pair scores straight from the topology (no table)."""
    weight = {frozenset((a, b)): pair_score(scene.topology, a, b) for a, b in itertools.combinations(scene.ids, 2)}
    others = [f for f in free if f not in must]
    return max(
        sum(weight[frozenset(p)] for p in itertools.combinations((*must, *extra), 2))
        for extra in itertools.combinations(others, size - len(must))
    )


def reset_tables() -> None:
    allocation._tables.clear()
    masks_of_size.cache_clear()


def request(rng: random.Random, scene: Scene, size: int) -> tuple[list[str], list[str]]:
    """A free set of at least `size` GPUs in random order, and a must-include GPU one time in four."""
    free = rng.sample(scene.ids, rng.randint(size, scene.n))
    must = [free[0]] if size > 1 and rng.random() < 0.25 else []
    return free, must


def measure(scene: Scene, calls: int, checks: int, rng: random.Random) -> list[Figure]:
    figures = []
    reset_tables()
    started = time.perf_counter()
    allocation.prepare(scene.resource, scene.topology)
    figures.append(Figure(f"{scene.profile}: tables built at discovery", "ms",
                          [(time.perf_counter() - started) * 1000]))
    worst_quality = 1.0
    for size in range(1, scene.n + 1):
        samples, cpu = [], []
        for i in range(calls):
            free, must = request(rng, scene, size)
            started, started_cpu = time.perf_counter(), time.thread_time()
            chosen = allocation.preferred(scene.resource, free, must, size, scene.topology)
            samples.append((time.perf_counter() - started) * 1000)
            cpu.append((time.thread_time() - started_cpu) * 1000)
            if i < checks and size > 1:
                best = reference_best(scene, free, must, size)
                worst_quality = min(worst_quality, scene.table.score(scene.mask(chosen)) / best if best else 1.0)
        # Wall time is the figure; CPU time of this thread shows what is ours when the machine is
        # busy (a 4 ms outlier with no CPU time behind it is the scheduler running someone else).
        figures.append(Figure(f"{scene.profile}: preferred allocation, size {size}", "ms", samples,
                              goal=goal_ms(scene.n), goal_stat="p99", note="first sample = first call",
                              extra={"cpu_ms": summarize(cpu)}))
    figures.append(Figure(f"{scene.profile}: score/optimum shortfall (1 - worst ratio)", "ratio",
                          [1.0 - worst_quality], goal=0.0, goal_stat="max"))
    # The worst first call: no table yet (as if discovery had not prepared it), half the GPUs asked.
    reset_tables()
    started = time.perf_counter()
    allocation.preferred(scene.resource, scene.ids, [], scene.n // 2, scene.topology)
    figures.append(Figure(f"{scene.profile}: cold call (no tables yet), size {scene.n // 2}", "ms",
                          [(time.perf_counter() - started) * 1000],
                          note="not the plugin's first call: discovery builds the tables first"))
    allocation.prepare(scene.resource, scene.topology)
    return figures


def run(settings: Settings) -> list[Figure]:
    rng = random.Random(5)
    figures: list[Figure] = []
    for profile in PROFILES:
        scene = Scene(profile)
        big = scene.n > 8
        calls = settings.n(100 if big else 300, 10)
        checks = settings.n(15 if big else 300, 3)
        found = measure(scene, calls, checks, rng)
        for f in found:
            s = f.summary()
            cpu = f" (cpu p99 {f.extra['cpu_ms']['p99']:.3f})" if "cpu_ms" in f.extra else ""
            print(f"{f.name:<58} p50 {s['p50']:7.3f}  p99 {s['p99']:7.3f}{cpu}  max {s['max']:7.3f} {f.unit}"
                  + ("" if f.met is None else f"  goal {f.goal_stat} <= {f.goal}: {'met' if f.met else 'MISSED'}"),
                  flush=True)
        figures += found
    return figures
