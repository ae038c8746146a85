"""The one back-off rule: wait `first_s` after the first failure, doubling up to `max_s`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    first_s: float
    max_s: float

    def delay(self, failures: int) -> float:
        """The wait after `failures` consecutive failures (1 = the first)."""
        return float(min(self.first_s * 2.0 ** min(failures - 1, 64), self.max_s))
