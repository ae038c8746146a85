"""A log line that may repeat thousands of times a minute, kept to one line plus a count.

The first occurrence of a key in a window is logged at once, as it is; the repeats are counted,
and when the window ends one summary line says how many there were (nothing when there were
none). An XID storm on one GPU, or a client sending garbage in a loop, thus costs two lines a
minute instead of one per event. Counters for metrics are kept elsewhere and stay exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

DEFAULT_WINDOW_S = 60.0


@dataclass
class _Window:
    ends: float
    fields: Mapping[str, object]  # the summary line's fields (the key's, not one event's)
    repeats: int = 0


class RepeatedLog:
    """`note(key, fields)` for each occurrence; `flush()` summarises windows that ended (it runs
    by itself on the running event loop when a window ends; `flush(everything=True)` at stop)."""

    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        message: str,
        summary: str,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._level = level
        self._message = message
        self._summary = summary
        self.window_s = window_s
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}

    def note(self, key: Hashable, fields: Mapping[str, object], summary_fields: Mapping[str, object] | None = None
             ) -> bool:
        """One occurrence; returns whether it was logged (the first of its window). `fields` go on
        that line, `summary_fields` (default: `fields`) on the window's summary."""
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now >= window.ends:
            self._summarise(key, window)
            window = None
        if window is not None:
            window.repeats += 1
            return False
        self._windows[key] = _Window(now + self.window_s, summary_fields if summary_fields is not None else fields)
        self._log.log(self._level, self._message, extra=dict(fields))
        with contextlib.suppress(RuntimeError):  # no running loop: summaries come with the next note or flush
            asyncio.get_running_loop().call_later(self.window_s, self.flush)
        return True

    def flush(self, everything: bool = False) -> None:
        now = self._clock()
        for key, window in list(self._windows.items()):
            if everything or now >= window.ends:
                self._summarise(key, window)

    def _summarise(self, key: Hashable, window: _Window) -> None:
        del self._windows[key]
        if window.repeats:
            self._log.log(self._level, self._summary,
                          extra={**window.fields, "repeats": window.repeats, "window_s": f"{self.window_s:g}"})
