"""Parsing option values as the official plugin does (urfave/cli v2): booleans as Go's
`strconv.ParseBool`, an env var that is set but empty counts as set (false for a boolean), lists
split on "," and trimmed; config-file values arrive typed (YAML), not as text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nvdp.config.options import Option
from nvdp.errors import ConfigError

_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_go_bool(name: str, raw: str) -> bool:
    if raw in _GO_TRUE:
        return True
    if raw in _GO_FALSE:
        return False
    raise ConfigError(name, f"{raw!r} is not a boolean (use true/false, 1/0, t/f)")


# Go's time.ParseDuration: a sequence of decimal numbers, each with a unit, optionally signed.
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
INFINITE = "infinite"


def parse_go_duration(name: str, raw: str) -> float:
    """A Go duration ("60s", "1m30s", "1.5h", "300ms") or "infinite", in seconds."""
    text = raw.strip()
    if text == INFINITE:
        return math.inf
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
    if body == "0":
        return 0.0
    total, pos = 0.0, 0
    while pos < len(body):
        match = _GO_PART.match(body, pos)
        if match is None:
            break
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    if not body or pos != len(body):
        raise ConfigError(name, f"{raw!r} is not a duration (e.g. 60s, 5m, 1h30m, or {INFINITE})")
    return sign * total


def split_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def parse_text(opt: Option, name: str, raw: str) -> Any:
    """Parse a value given as text (a CLI argument or an env var)."""
    match opt.kind:
        case "bool":
            return False if raw == "" else parse_go_bool(name, raw)
        case "list":
            return split_list(raw)
        case "intlist":
            try:
                return tuple(int(x) for x in split_list(raw))
            except ValueError:
                raise ConfigError(name, f"{raw!r} is not a comma-separated list of integers") from None
        case "int":
            try:
                return int(raw)
            except ValueError:
                raise ConfigError(name, f"{raw!r} is not an integer") from None
        case "float":
            try:
                return float(raw)
            except ValueError:
                raise ConfigError(name, f"{raw!r} is not a number") from None
        case "duration":
            return parse_go_duration(name, raw)
        case _:
            return raw


# ---------------------------------------------------------------------------------------------
# The config file (schema v1)


def lookup(doc: Mapping[str, Any], dotted: str) -> Any:
    node: Any = doc
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def file_value(opt: Option, raw: Any, key: str) -> Any:
    """Check and convert a value read from the config file (typed YAML, not text); `key` names
    it in errors ("flags.migStrategy in /etc/nvdp/config.yaml")."""
    match opt.kind:
        case "bool":
            if not isinstance(raw, bool):
                raise ConfigError(key, f"{raw!r} is not a boolean (true or false, without quotes)")
            return raw
        case "list":
            # deviceListStrategy may be one string or a list of strings.
            if isinstance(raw, str):
                return (raw,)
            if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
                return tuple(raw)
            if isinstance(raw, list) and all(isinstance(x, str | int) and not isinstance(x, bool) for x in raw):
                return tuple(str(x) for x in raw)  # e.g. a YAML list of XID numbers
            raise ConfigError(key, f"{raw!r} is not a string or a list of strings")
        case "intlist":
            if isinstance(raw, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
                return tuple(raw)
            raise ConfigError(key, f"{raw!r} is not a list of integers")
        case "int" | "float":
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise ConfigError(key, f"{raw!r} is not a number")
            return float(raw) if opt.kind == "float" else int(raw)
        case "duration":
            # As the official schema: a number is nanoseconds, a string a Go duration or "infinite".
            if isinstance(raw, str):
                return parse_go_duration(key, raw)
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise ConfigError(key, f"{raw!r} is not a duration (e.g. 60s, or a number of nanoseconds)")
            return raw / 1e9
        case _:
            if not isinstance(raw, str):
                raise ConfigError(key, f"{raw!r} is not a string")
            return raw


@dataclass(frozen=True)
class HealthItems:
    """A DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS list, read as upstream reads it."""

    words: frozenset[str] = frozenset()  # "all", "xids"
    numbers: frozenset[int] = frozenset()  # XIDs
    malformed: tuple[str, ...] = ()  # entries that are neither: ignored, as upstream (with a warning)


def health_items(values: Iterable[str]) -> HealthItems:
    """The words ('all', 'xids') and XID numbers of a health switch list, lower-cased and trimmed
    as upstream. An entry that is neither (a typo, a negative number, `4.5`) is not an error: the
    official plugin logs "Ignoring malformed Xid value" and goes on, so a DaemonSet that runs under
    it must not crash-loop here; `malformed` lists them for that warning."""
    words: set[str] = set()
    numbers: set[int] = set()
    malformed: list[str] = []
    for raw in values:
        item = raw.strip().lower()
        if not item:
            continue
        if item in ("all", "xids"):
            words.add(item)
        elif item.isascii() and item.isdigit():  # no sign, no point: what Go's ParseUint accepts
            numbers.add(int(item))
        else:
            malformed.append(raw.strip())
    return HealthItems(frozenset(words), frozenset(numbers), tuple(malformed))
