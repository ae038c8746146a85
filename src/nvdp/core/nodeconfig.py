"""Which named config a node uses: the official config-manager's selection rules, as a pure function.

1. The node label's value, when set: that config must exist (else the answer is `Unknown`).
2. Else `default` (DEFAULT_CONFIG), which must exist.
3. Else the fallback strategies in order: `named` (a config called "default"), `single` (the only
   config), `empty` (no config file at all: the plugin's built-in defaults).
With no config at all, or nothing chosen, the answer is `NoChoice`.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass
from typing import Literal

from nvdp.config.manager import FallbackStrategy

NAMED_DEFAULT = "default"
EMPTY = ""  # the empty config: the link points at /dev/null


@dataclass(frozen=True)
class Chosen:
    name: str  # EMPTY for the empty config
    why: Literal["label", "default", "named", "single", "empty"]

    def describe(self) -> str:
        return "the empty config" if self.name == EMPTY else f"config {self.name!r}"


@dataclass(frozen=True)
class Unknown:
    """The label names a config that is not there."""

    label: str
    available: tuple[str, ...]

    def describe(self) -> str:
        names = ", ".join(self.available) or "none"
        return f"the node label asks for config {self.label!r}, which does not exist (available: {names})"


@dataclass(frozen=True)
class NoChoice:
    """No label, and neither the default nor a fallback gives a config."""

    reason: str

    def describe(self) -> str:
        return self.reason


Selection = Chosen | Unknown | NoChoice


def choose(label: str, available: Set[str], default: str, fallbacks: Sequence[FallbackStrategy]) -> Selection:
    names = tuple(sorted(available))
    if not names:
        return NoChoice("no configuration files available")
    if label:
        return Chosen(label, "label") if label in available else Unknown(label, names)
    return choose_default(available, default, fallbacks)


def choose_default(available: Set[str], default: str, fallbacks: Sequence[FallbackStrategy]) -> Chosen | NoChoice:
    """What a node without the label gets (rules 2 and 3)."""
    names = tuple(sorted(available))
    if default:
        if default in available:
            return Chosen(default, "default")
        return NoChoice(f"the default config {default!r} does not exist (available: {', '.join(names) or 'none'})")
    for strategy in fallbacks:
        if strategy == "named" and NAMED_DEFAULT in available:
            return Chosen(NAMED_DEFAULT, "named")
        if strategy == "single" and len(names) == 1:
            return Chosen(names[0], "single")
        if strategy == "empty":
            return Chosen(EMPTY, "empty")
    tried = ",".join(fallbacks) or "none"
    return NoChoice(f"no config was named by the label, no default was given, and no fallback strategy "
                    f"({tried}) chose one of: {', '.join(names)}")
