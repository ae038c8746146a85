"""What every benchmark module shares: figures, percentiles, goals, the machine, JSON and tables.

A benchmark module is any module with

    def run(settings: Settings) -> list[Figure]          # or an `async def` returning the same

registered by one line in `bench/__main__.py`. A `Figure` holds raw samples; the harness turns
them into percentiles, checks the goal and writes `bench/results/<module>.json`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Stat = Literal["p50", "p90", "p99", "max", "mean"]


@dataclass(frozen=True)
class Settings:
    quick: bool = False

    def n(self, full: int, quick: int) -> int:
        """How many repetitions to run: `quick` ones in --quick mode, `full` ones otherwise."""
        return quick if self.quick else full


@dataclass
class Figure:
    """One measured quantity: raw samples (one per run) and, optionally, an upper-bound goal."""

    name: str
    unit: str
    samples: list[float]
    goal: float | None = None  # the figure meets its goal when `goal_stat` of the samples <= goal
    goal_stat: Stat = "p50"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping in the JSON

    def summary(self) -> dict[str, float]:
        return summarize(self.samples)

    @property
    def met(self) -> bool | None:
        if self.goal is None or not self.samples:
            return None
        return self.summary()[self.goal_stat] <= self.goal

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            **self.summary(),
            "goal": self.goal,
            "goal_stat": self.goal_stat if self.goal is not None else None,
            "met": self.met,
            "note": self.note,
            **({"extra": self.extra} if self.extra else {}),
        }


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """n, min, p50, p90, p99, max and mean (percentiles interpolated between the samples)."""
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    if len(ordered) == 1:
        p50 = p90 = p99 = ordered[0]
    else:
        cuts = statistics.quantiles(ordered, n=100, method="inclusive")
        p50, p90, p99 = cuts[49], cuts[89], cuts[98]
    return {
        "n": len(ordered),
        "min": ordered[0],
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def machine() -> dict[str, Any]:
    """The machine the figures come from, printed and stored with every result."""
    import google.protobuf
    import grpc
    from google.protobuf.internal import api_implementation

    import nvdp

    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "protobuf_backend": api_implementation.Type(),
        "nvdp": nvdp.__version__,
        "git_commit": _git_commit(),
        "executable": sys.executable,
        # Other work on the machine (a CI neighbour, a parallel build) skews latencies: keep it on record.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def write_result(
    directory: Path, module: str, figures: list[Figure], machine_info: dict[str, Any], settings: Settings,
    started: datetime.datetime, duration_s: float, error: str | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{module}.json"
    doc = {
        "benchmark": module,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(duration_s, 2),
        "quick": settings.quick,
        "machine": machine_info,
        "figures": [f.as_json() for f in figures],
        "error": error,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _goal_text(figure: Figure) -> str:
    if figure.goal is None:
        return ""
    verdict = {True: "met", False: "MISSED", None: "?"}[figure.met]
    return f"{figure.goal_stat} <= {_fmt(figure.goal)}: {verdict}"


def table(rows: Sequence[tuple[str, Figure]], markdown: bool = False) -> str:
    """One row per figure: module, figure, n, p50, p90, p99, max, unit, goal."""
    header = ["module", "figure", "n", "p50", "p90", "p99", "max", "unit", "goal"]
    body = []
    for module, f in rows:
        s = f.summary()
        body.append([
            module, f.name, str(s.get("n", 0)), _fmt(s.get("p50")), _fmt(s.get("p90")), _fmt(s.get("p99")),
            _fmt(s.get("max")), f.unit, _goal_text(f),
        ])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body])


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cpu_model']}, {info['usable_cores']}/{info['cores']} cores, {info['memory_gib']} GiB, "
        f"Python {info['python']}, grpcio {info['grpcio']}, protobuf {info['protobuf']} ({info['protobuf_backend']}), "
        f"nvdp {info['nvdp']} @ {info['git_commit']}; load average {info['load_average_at_start'][0]}"
    )
