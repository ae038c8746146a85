"""Log formatting: one line per event, with the event's fields under stable keys.

Code logs with `log.info("registered", extra={"resource": name})`. The text formatter appends the
extra fields as logfmt `key=value` (quoted and escaped where needed); the JSON formatter writes
one object per line with the fixed keys `time`, `level`, `logger`, `message`, then the extra
fields (`resource`, `device`, `reason`, `xid`, `error`, `config`, ...), then `exception` when a
traceback was asked for. Set up by the CLI only (nothing is configured at import time).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def fields_of(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={_quote(v)}" for k, v in sorted(fields_of(record).items()))
        return f"{line} {extras}" if extras else line


def _quote(value: object) -> str:
    """A logfmt value: bare when it can be, else in double quotes with `"`, `\\` and control
    characters escaped (JSON string escapes), so one event stays one parseable line. Structured
    values (the config) are written as compact JSON first."""
    if isinstance(value, dict | list | tuple):
        text = json.dumps(value, separators=(",", ":"), default=str, ensure_ascii=False)
    else:
        text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; keys never collide with the fixed ones (extras are prefixed)."""

    FIXED = ("time", "level", "logger", "message")

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in sorted(fields_of(record).items()):
            event[f"extra_{key}" if key in self.FIXED else key] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str, ensure_ascii=False)


FORMATTERS: dict[str, type[logging.Formatter]] = {"text": TextFormatter, "json": JsonFormatter}


def setup(level: str = "info", stream: object = None, fmt: str = "text") -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(FORMATTERS[fmt]())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("grpc").setLevel(logging.WARNING)


class LogOnce:
    """Remembers the last message per key, so that a failure repeated on every retry is logged once
    and a different one (or the same after `forget`) is logged again."""

    def __init__(self) -> None:
        self._last: dict[object, str] = {}

    def first(self, message: str, key: object = None) -> bool:
        """True when `message` is new for `key` (log it now); False when it was the last one logged."""
        if self._last.get(key) == message:
            return False
        self._last[key] = message
        return True

    def forget(self, key: object = None) -> None:
        self._last.pop(key, None)

    def last(self, key: object = None) -> str | None:
        return self._last.get(key)

    def items(self) -> list[tuple[object, str]]:
        return list(self._last.items())
