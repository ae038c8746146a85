"""Shared pieces of the benchmarks: settings, figures with percentiles and goals, the machine, JSON.

A benchmark module has `run(settings: Settings) -> list[Figure]` (or an async one) and is
registered by one line in `bench/__main__.py`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
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
        return quick if self.quick else full


@dataclass
class Figure:
    """Raw samples of one quantity and, optionally, an upper-bound goal on one statistic."""

    name: str
    unit: str
    samples: list[float]
    goal: float | None = None
    goal_stat: Stat = "p50"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        return summarize(self.samples)

    @property
    def met(self) -> bool | None:
        if self.goal is None or not self.samples:
            return None
        return self.summary()[self.goal_stat] <= self.goal

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, **self.summary(), "goal": self.goal,
                "goal_stat": self.goal_stat if self.goal is not None else None, "met": self.met,
                "note": self.note, **({"extra": self.extra} if self.extra else {})}


def summarize(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 99
    return {"n": len(ordered), "min": ordered[0], "p50": cuts[49], "p90": cuts[89], "p99": cuts[98],
            "max": ordered[-1], "mean": statistics.fmean(ordered)}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    import grpc

    return {"cpu_model": cpu, "cores": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version(), "grpcio": grpc.__version__,
            # Other work on the machine skews latency figures: keep how busy it was.
            "load_average": os.getloadavg(), "executable": sys.executable}


def write_result(directory: Path, module: str, figures: list[Figure], info: dict[str, Any], settings: Settings,
                 started: datetime.datetime, duration_s: float, error: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{module}.json"
    doc = {"benchmark": module, "started": started.isoformat(timespec="seconds"), "duration_s": round(duration_s, 2),
           "quick": settings.quick, "machine": info, "figures": [f.as_json() for f in figures], "error": error}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def table(rows: Sequence[tuple[str, Figure]]) -> str:
    header = ["module", "figure", "n", "p50", "p99", "max", "unit", "goal"]
    body = []
    for module, f in rows:
        s = f.summary()
        goal = "" if f.goal is None else f"{f.goal_stat} <= {f.goal:g}: {'met' if f.met else 'MISSED'}"
        body.append([module, f.name, str(int(s.get("n", 0))), *(f"{s[k]:.2f}" if k in s else "-"
                     for k in ("p50", "p99", "max")), f.unit, goal])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body])
