"""Log lines: stable keys in text and JSON, tracebacks only when asked for."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from nvdp.ops import logs


@pytest.fixture
def capture() -> Iterator[tuple[io.StringIO, logging.Logger]]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    yield stream, logging.getLogger("nvdp.test")
    root.handlers[:], level = saved
    root.setLevel(level)


def test_json_lines_have_fixed_keys_then_the_extra_fields(capture: tuple[io.StringIO, logging.Logger]) -> None:
    stream, log = capture
    logs.setup("info", stream, fmt="json")
    log.info("device unhealthy", extra={"resource": "nvidia.com/gpu", "device": "GPU-1", "reason": "XID 79",
                                        "xid": 79})
    log.debug("not shown at info")
    (line,) = stream.getvalue().splitlines()
    event = json.loads(line)
    assert list(event)[:4] == ["time", "level", "logger", "message"]
    assert event["level"] == "info" and event["logger"] == "nvdp.test" and event["message"] == "device unhealthy"
    assert (event["resource"], event["device"], event["reason"], event["xid"]) == ("nvidia.com/gpu", "GPU-1",
                                                                                    "XID 79", 79)
    assert event["time"].endswith("+00:00")


def test_json_extras_cannot_overwrite_fixed_keys(capture: tuple[io.StringIO, logging.Logger]) -> None:
    stream, log = capture
    logs.setup("info", stream, fmt="json")
    log.warning("hello %s", "there", extra={"time": "yesterday", "level": "x"})
    event = json.loads(stream.getvalue())
    assert event["message"] == "hello there" and event["level"] == "warning"
    assert event["extra_time"] == "yesterday" and event["extra_level"] == "x"


def test_json_exception_only_when_asked(capture: tuple[io.StringIO, logging.Logger]) -> None:
    stream, log = capture
    logs.setup("info", stream, fmt="json")
    try:
        raise ValueError("boom")
    except ValueError:
        log.error("expected failure", extra={"error": "boom"})
        log.exception("unexpected failure")
    expected, unexpected = (json.loads(line) for line in stream.getvalue().splitlines())
    assert "exception" not in expected and expected["error"] == "boom"
    assert "ValueError: boom" in unexpected["exception"]


def test_text_lines_carry_key_value_pairs(capture: tuple[io.StringIO, logging.Logger]) -> None:
    stream, log = capture
    logs.setup("debug", stream)
    log.info("registered", extra={"resource": "nvidia.com/gpu", "reason": "two words"})
    line = stream.getvalue().strip()
    assert line.endswith('registered reason="two words" resource=nvidia.com/gpu')
    assert "INFO nvdp.test:" in line
