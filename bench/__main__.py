"""`python -m bench [MODULE...] [--quick]`: run the benchmarks, write bench/results/<module>.json, print a table.

To add a benchmark: write `bench/<name>.py` with `run(settings) -> list[Figure]` (bench/harness.py)
and add one line to MODULES.
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

from bench.harness import Figure, Settings, machine, table, write_result

MODULES: dict[str, str] = {
    "health": "bench.health",  # injected fault -> ListAndWatch update at the kubelet; recovery overshoot
    "allocation": "bench.allocation",  # GetPreferredAllocation time per call and exactness, per profile and size
    "workload": "bench.workload",  # allocation quality over time: nvdp vs first-fit, per-request optimum, official
}
RESULTS = Path(__file__).parent / "results"


def run_module(name: str, settings: Settings) -> list[Figure]:
    result = importlib.import_module(MODULES[name]).run(settings)
    figures: list[Figure] = asyncio.run(result) if inspect.iscoroutine(result) else result
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"any of: {', '.join(MODULES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write <module>.json")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s): {', '.join(unknown)}; known: {', '.join(MODULES)}")
    settings, info = Settings(quick=args.quick), machine()
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, Python {info['python']}, grpcio {info['grpcio']}, "
          f"load {info['load_average'][0]:.2f}", flush=True)
    rows: list[tuple[str, Figure]] = []
    failed = []
    for name in args.modules or list(MODULES):
        started, t0 = datetime.datetime.now(datetime.UTC), time.monotonic()
        print(f"== {name} ...", flush=True)
        figures: list[Figure] = []
        error = None
        try:
            figures = run_module(name, settings)
        except Exception:
            error = traceback.format_exc()
            failed.append(name)
            print(error, file=sys.stderr)
        path = write_result(args.results, name, figures, info, settings, started, time.monotonic() - t0, error)
        print(f"   {len(figures)} figures in {time.monotonic() - t0:.1f} s -> {path}", flush=True)
        rows += [(name, f) for f in figures]
    print(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
