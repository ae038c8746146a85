"""`python -m bench [MODULE...] [--quick]`: run the benchmarks, write bench/results/*.json, print a table.

To add a benchmark module: write `bench/<name>.py` with `run(settings) -> list[Figure]` (see
bench/harness.py) and add one line to MODULES below. A missed goal is reported, not an error
(exit 0) unless --strict; a module that raises is an error (exit 1) after the others have run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import inspect
import sys
import time
import traceback
from pathlib import Path

from bench.harness import Figure, Settings, machine, machine_line, table, write_result

# name -> module; run in this order. One line per module.
MODULES: dict[str, str] = {
    "core": "bench.core",  # exec -> device list, kubelet restart, round trips, ListAndWatch fan-out
    "memory": "bench.memory",  # RSS after registration / 10,000 allocations, Python allocations per call
    "scale": "bench.scale",  # largest device list served vs the kubelet's 4 MiB message limit
    "health": "bench.health",  # injected fault -> ListAndWatch update at the kubelet; recovery overshoot
    "allocation": "bench.allocation",  # GetPreferredAllocation time per call and exactness, per profile and size
    "workload": "bench.workload",  # allocation quality over time: nvdp vs first-fit, per-request optimum, official
    "sharing": "bench.sharing",  # ListAndWatch size and RSS: 8 GPUs x 48 MPS replicas, x 1024 time-slicing
    "official": "bench.official",  # issue 14: NVML-path start-up, RSS, Allocate and pod admission vs the Go plugin
}

RESULTS = Path(__file__).parent / "results"


def run_module(name: str, settings: Settings) -> list[Figure]:
    module = importlib.import_module(MODULES[name])
    result = module.run(settings)
    if inspect.iscoroutine(result):
        result = asyncio.run(result)
    figures: list[Figure] = result
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"any of: {', '.join(MODULES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run, not figures to publish")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write <module>.json")
    parser.add_argument("--markdown", action="store_true", help="print the summary as a markdown table")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed (default: report only)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s): {', '.join(unknown)}; known: {', '.join(MODULES)}")

    settings = Settings(quick=args.quick)
    info = machine()
    print(f"machine: {machine_line(info)}", flush=True)
    rows: list[tuple[str, Figure]] = []
    failed: list[str] = []
    begin = time.monotonic()
    for name in args.modules or list(MODULES):
        started, t0 = datetime.datetime.now(datetime.UTC), time.monotonic()
        print(f"== {name} ...", flush=True)
        error = None
        figures: list[Figure] = []
        try:
            figures = run_module(name, settings)
        except Exception:
            error = traceback.format_exc()
            failed.append(name)
            print(error, file=sys.stderr)
        path = write_result(args.results, name, figures, info, settings, started, time.monotonic() - t0, error)
        print(f"   {len(figures)} figures in {time.monotonic() - t0:.1f} s -> {path}", flush=True)
        rows += [(name, f) for f in figures]

    print()
    print(table(rows, markdown=args.markdown))
    missed = [f"{m}: {f.name}" for m, f in rows if f.met is False]
    print(f"\n{len(rows)} figures in {time.monotonic() - begin:.0f} s; goals missed: {len(missed)}"
          + (" (" + "; ".join(missed) + ")" if missed else ""))
    if failed:
        print(f"benchmark modules that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
