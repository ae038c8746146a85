"""Soak: allocation load on the real plugin process for a long time, then its RSS growth.

    scripts/soak [--duration 600] [--callers 8] [--restart-every 0] [--replicas 1]

The plugin (`nvidia-device-plugin --simulate dgx-h100`) runs as a child process; the fake kubelet
here sends Allocate (1-2 devices) and GetPreferredAllocation calls from `--callers` concurrent
tasks until the time is up, optionally restarting itself every `--restart-every` seconds. RSS and
open descriptors of the child are sampled throughout. Growth is measured from the end of the
warm-up (caches, gRPC pools) to the end. Exit status 1 when growth reaches the goal (5 %) or any
call failed. Results also go to bench/results/soak.json. Not part of CI: it runs for minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import machine, machine_line
from bench.rig import DGX_GPUS, SIMULATED, START_TIMEOUT_S
from nvdp.core.resources import GPU_RESOURCE
from nvdp.testing import FakeKubelet
from nvdp.testing.process import PluginProcess, open_fds, rss_kib

RESULTS = Path(__file__).parent / "results"
GOAL_PCT = 5.0


@dataclass
class Sample:
    at_s: float
    rss_mib: float
    fds: int
    calls: int


@dataclass
class Soak:
    kubelet: FakeKubelet
    plugin: PluginProcess
    calls: int = 0
    failures: list[str] = field(default_factory=list)
    restarts: int = 0
    interrupted: int = 0

    async def caller(self, seed: int, until: float) -> None:
        rng = random.Random(seed)
        while time.monotonic() < until:
            try:
                endpoint = await self.kubelet.wait_registered(GPU_RESOURCE, timeout=START_TIMEOUT_S)
                ids = sorted(endpoint.devices)
                if self.calls % 10 == 9:
                    await self.kubelet.preferred_allocation(GPU_RESOURCE, ids, [], 2)
                else:
                    await self.kubelet.allocate(GPU_RESOURCE, rng.sample(ids, rng.choice((1, 2))))
                self.calls += 1
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
                self.interrupted += 1  # the fake kubelet restarted under this call and cancelled it
            except Exception as exc:  # a soak reports every failure instead of stopping at the first
                if self.restarts == 0 or "no plugin registered" not in str(exc):
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.01)

    async def restarter(self, every: float, until: float) -> None:
        while every > 0 and time.monotonic() + every < until:
            await asyncio.sleep(every)
            await self.kubelet.restart()
            self.restarts += 1


async def soak(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="nvdp-soak-") as folder:
        extra: tuple[str, ...] = ()
        if args.replicas > 1:
            config = Path(folder) / "config.yaml"
            config.write_text(f"sharing:\n  timeSlicing:\n    resources: [{{name: {GPU_RESOURCE}, "
                              f"replicas: {args.replicas}}}]\n")
            extra = (f"--config-file={config}",)
        async with FakeKubelet(folder) as kubelet, PluginProcess(folder, (*SIMULATED, *extra)) as plugin:
            await kubelet.wait_registered(GPU_RESOURCE, timeout=START_TIMEOUT_S, min_devices=DGX_GPUS)
            run = Soak(kubelet, plugin)
            start = time.monotonic()
            until = start + args.duration
            samples: list[Sample] = []

            async def sampler() -> None:
                while True:
                    samples.append(Sample(round(time.monotonic() - start, 1), rss_kib(plugin.pid) / 1024,
                                          open_fds(plugin.pid), run.calls))
                    if time.monotonic() >= until:
                        return
                    await asyncio.sleep(min(args.sample_every, max(0.0, until - time.monotonic())))

            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(sampler())
                tasks.create_task(run.restarter(args.restart_every, until))
                for seed in range(args.callers):
                    tasks.create_task(run.caller(seed, until))
            log = plugin.log()

    warm_up = args.warm_up if args.warm_up is not None else min(60.0, args.duration / 10)
    baseline = next((s for s in samples if s.at_s >= warm_up), samples[0])
    end = samples[-1]
    growth = (end.rss_mib - baseline.rss_mib) / baseline.rss_mib * 100
    return {
        "duration_s": args.duration, "callers": args.callers, "replicas": args.replicas,
        "restart_every_s": args.restart_every, "kubelet_restarts": run.restarts,
        "calls_interrupted_by_restarts": run.interrupted,
        "calls": run.calls, "calls_per_s": round(run.calls / args.duration, 1), "failures": run.failures[:20],
        "failure_count": len(run.failures), "rss_start_mib": samples[0].rss_mib,
        "rss_after_warm_up_mib": baseline.rss_mib, "warm_up_s": warm_up, "rss_end_mib": end.rss_mib,
        "rss_growth_pct": round(growth, 2), "goal_pct": GOAL_PCT, "fds_start": samples[0].fds, "fds_end": end.fds,
        "tracebacks_in_plugin_log": log.count("Traceback"),
        "samples": [vars(s) for s in samples],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers (default 8)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--warm-up", type=float, default=None, help="seconds before the RSS baseline "
                        "(default: a tenth of the duration, at most 60)")
    parser.add_argument("--restart-every", type=float, default=0.0, help="restart the kubelet this often (0: never)")
    parser.add_argument("--replicas", type=int, default=1, help="time-slicing replicas per GPU (default 1: none)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write soak.json")
    args = parser.parse_args(argv)

    info = machine()
    print(f"machine: {machine_line(info)}", flush=True)
    print(f"soaking for {args.duration:.0f} s with {args.callers} callers ...", flush=True)
    result = asyncio.run(soak(args))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "soak.json").write_text(json.dumps({"machine": info, **result}, indent=2) + "\n")
    samples, growth = result["samples"], result["rss_growth_pct"]
    assert isinstance(samples, list) and isinstance(growth, float)
    for s in samples:
        print(f"  t={s['at_s']:>7.1f} s  RSS {s['rss_mib']:6.1f} MiB  fds {s['fds']:>3}  calls {s['calls']:>8}")
    ok = growth < GOAL_PCT and result["failure_count"] == 0
    print(f"{result['calls']} calls ({result['calls_per_s']}/s), {result['failure_count']} failed, "
          f"{result['kubelet_restarts']} kubelet restarts; RSS {result['rss_after_warm_up_mib']:.1f} MiB after "
          f"{result['warm_up_s']:.0f} s warm-up -> {result['rss_end_mib']:.1f} MiB at the end: "
          f"{result['rss_growth_pct']:+.2f} % (goal < {GOAL_PCT:.0f} %): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
