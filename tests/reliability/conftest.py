"""Helpers for the reliability suite: log checks and process bookkeeping.

The suite drives the real plugin (in-process, or the console script as a child process) through
the fake kubelet. Waits are generous and assertions are on counts and states, never on elapsed
time, so a slow CI machine makes it slower, not red (nvdp.testing.waiting: `eventually`, and
`WAIT_S` as the bound for anything that should happen soon).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator

import pytest


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class LogWatch:
    """Every log record at INFO and above, and what counts as a problem among them: a traceback
    anywhere, or an ERROR that the test did not declare in `allowed` (regular expressions)."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.allowed: list[str] = []

    @property
    def records(self) -> list[logging.LogRecord]:
        return self.caplog.records

    def count(self, logger: str, message: str) -> int:
        """Records of `logger` whose message starts with `message`."""
        return sum(1 for r in self.records if r.name == logger and r.getMessage().startswith(message))

    def problems(self) -> list[str]:
        patterns = [re.compile(p) for p in self.allowed]
        found = []
        for r in self.records:
            message = r.getMessage()
            if r.exc_info or r.exc_text or "Traceback" in message:
                found.append(f"{r.name}: {message} (with a traceback)")
            elif r.levelno >= logging.ERROR and not any(p.search(message) for p in patterns):
                found.append(f"{r.levelname} {r.name}: {message}")
        return found


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[LogWatch]:
    """Fails the test after the fact if the log shows a traceback or an unexpected error."""
    caplog.set_level(logging.INFO)
    watch = LogWatch(caplog)
    yield watch
    assert watch.problems() == [], "unexpected errors in the log"
