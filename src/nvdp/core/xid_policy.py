"""The XID policy as data: the built-in table, the config file's overrides, the DP_* switches on
top, and what the driver's GPU recovery action says.

Pure: no NVML, no clock. `health.py` asks `XidTable.rule` how to treat an XID and
`recovery_severity` what a recovery action means; `effective_policy` is the table
`nvdp health policy` prints (docs/health.md has the schema and the reasoning per row).

Layers, lowest first (a later one wins for the XIDs it names):
1. the built-in table (`XID_POLICY`): class (transient or fatal), whether it is ignored by
   default (the official plugin's six), what it means and where that reading comes from;
2. the config file's `flags.nvdp.health.xids` (`Config.xid_overrides`): per XID a class
   (transient, fatal or ignored) and optionally the reason to show;
3. DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS (`health.check_switches`), with the
   official meanings: DISABLE numbers are ignored, ENABLE numbers are acted on (with the class
   the table gives them), `all` and `xids` as documented;
4. at run time, where the driver reports it, the GPU recovery action decides the class of an
   acted-on XID (`recovery_severity`), unless `--health-recovery-action=false`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from nvdp.config.options import XidOverride


class Severity(enum.StrEnum):
    TRANSIENT = "transient"
    FATAL = "fatal"
    CONDITION = "condition"


# Where a built-in reading comes from (the `source` column of `nvdp health policy`).
CATALOG = "built-in: NVIDIA XID catalog"
MEMORY_GUIDE = "built-in: NVIDIA GPU memory error management guide"
OFFICIAL_IGNORED = "built-in: the official plugin's default ignore list (application errors)"
UNKNOWN = "built-in: an XID not in the table is fatal, as in the official plugin"
CONFIG_FILE = "config file (flags.nvdp.health.xids)"
DISABLE_SWITCH = "DP_DISABLE_HEALTHCHECKS"
ENABLE_SWITCH = "DP_ENABLE_HEALTHCHECKS"


@dataclass(frozen=True)
class XidClass:
    """How one XID is treated: `severity` when it is acted on; `ignored`: not acted on unless
    DP_ENABLE_HEALTHCHECKS names it (it is still counted in the metrics)."""

    meaning: str
    severity: Severity
    ignored: bool = False
    source: str = CATALOG


_T, _F = Severity.TRANSIENT, Severity.FATAL

# Our reading of NVIDIA's XID catalog (Ampere and later). TRANSIENT: the error ends with the
# application that caused it, or the driver contained it, and the GPU keeps working. FATAL: the
# catalog's answer is a GPU reset (or worse). See docs/health.md for the reasoning per row.
XID_POLICY: Mapping[int, XidClass] = {
    8: XidClass("GPU stopped processing (channel idle timeout)", _T),
    13: XidClass("graphics engine exception", _T, True, OFFICIAL_IGNORED),
    31: XidClass("GPU memory page fault", _T, True, OFFICIAL_IGNORED),
    32: XidClass("invalid or corrupted push buffer stream", _T),
    43: XidClass("GPU stopped processing (application error)", _T, True, OFFICIAL_IGNORED),
    45: XidClass("preemptive cleanup after an earlier error", _T, True, OFFICIAL_IGNORED),
    48: XidClass("double-bit ECC error", _F, source=MEMORY_GUIDE),
    62: XidClass("internal micro-controller halt", _F),
    63: XidClass("ECC page retirement or row remapping recorded", _T, source=MEMORY_GUIDE),
    64: XidClass("ECC page retirement or row remapping failed", _F, source=MEMORY_GUIDE),
    68: XidClass("video decoder exception", _T, True, OFFICIAL_IGNORED),
    69: XidClass("graphics engine class error", _T),
    74: XidClass("NVLink error", _F),
    79: XidClass("GPU has fallen off the bus", _F),
    92: XidClass("high single-bit ECC error rate", _T, source=MEMORY_GUIDE),
    94: XidClass("contained uncorrectable ECC error", _T, source=MEMORY_GUIDE),
    95: XidClass("uncontained uncorrectable ECC error", _F, source=MEMORY_GUIDE),
    109: XidClass("context switch timeout", _T, True, OFFICIAL_IGNORED),
    119: XidClass("GSP RPC timeout", _F),
    120: XidClass("GSP error", _F),
    154: XidClass("GPU recovery action changed (reset or reboot required)", _F),
}

UNKNOWN_XID = XidClass("unknown XID", Severity.FATAL, source=UNKNOWN)

# The official plugin's default ignore set (application errors, not GPU faults).
DEFAULT_IGNORED_XIDS = frozenset(x for x, c in XID_POLICY.items() if c.ignored)


def classify_xid(xid: int) -> XidClass:
    """The built-in class of an XID (no config file, no switches)."""
    return XID_POLICY.get(xid, UNKNOWN_XID)


@dataclass(frozen=True)
class XidTable:
    """The built-in table with the config file's overrides applied (hashable: it is part of the
    health settings, which decide whether the health checks restart on a reload)."""

    overrides: tuple[XidOverride, ...] = ()

    def rule(self, xid: int) -> XidClass:
        base = classify_xid(xid)
        override = self._by_xid.get(xid)
        if override is None:
            return base
        meaning = override.reason or (base.meaning if xid in XID_POLICY else "no built-in meaning")
        if override.cls == "ignored":
            # Ignored here; DP_ENABLE_HEALTHCHECKS can still switch it on, with the built-in class.
            return XidClass(meaning, base.severity, True, CONFIG_FILE)
        return XidClass(meaning, Severity(override.cls), False, CONFIG_FILE)

    @cached_property
    def _by_xid(self) -> Mapping[int, XidOverride]:
        return {o.xid: o for o in self.overrides}

    def listed(self) -> list[int]:
        return sorted(set(XID_POLICY) | {o.xid for o in self.overrides})

    def ignored(self) -> frozenset[int]:
        return frozenset(x for x in self.listed() if self.rule(x).ignored)


BUILTIN_TABLE = XidTable()


# ---------------------------------------------------------------------------------------------
# The GPU recovery action (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION, nvmlDeviceGpuRecoveryAction_t)


class RecoveryAction(enum.IntEnum):
    """NVML's values (NVML_GPU_RECOVERY_ACTION_*); newer drivers may report more."""

    NONE = 0
    GPU_RESET = 1
    NODE_REBOOT = 2
    DRAIN_P2P = 3
    DRAIN_AND_RESET = 4
    RECOVER_IMEX_DOMAIN = 5
    BUS_RESET = 6
    SYSTEM_REBOOT = 7


def recovery_label(action: int) -> str:
    """"gpu-reset", "node-reboot"...; "unknown-<n>" for a value this build does not know."""
    try:
        return RecoveryAction(action).name.lower().replace("_", "-")
    except ValueError:
        return f"unknown-{action}"


def recovery_severity(action: int) -> Severity:
    """NONE: the GPU can be used again by a new process, so the fault is transient. Anything
    else (a GPU reset, a drain, a reboot, or a value we do not know) is fatal: it stays until
    the GPU is reset or the driver reports another action (the probe reads it again)."""
    return Severity.TRANSIENT if action == RecoveryAction.NONE else Severity.FATAL


# ---------------------------------------------------------------------------------------------
# The effective table


@dataclass(frozen=True)
class EffectiveXid:
    """One row of `nvdp health policy`: what happens to this XID, why, and which layer decided."""

    xid: int | None  # None: every XID not listed
    effect: str  # "transient", "fatal" or "ignored"
    meaning: str
    source: str


def effective_policy(
    table: XidTable, ignored: frozenset[int], only: frozenset[int] | None,
    disabled: Iterable[int] = (), enabled: Iterable[int] = (), only_source: str = DISABLE_SWITCH,
) -> list[EffectiveXid]:
    """Every XID the table, the config file or a switch names, then one row for the others.

    `ignored` / `only` are the switches' result (`health.XidFilter`); `disabled` / `enabled`
    the numbers DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS named, to say which layer decided.
    """
    disabled, enabled = frozenset(disabled), frozenset(enabled)

    def acts_on(xid: int) -> bool:
        return xid in only if only is not None else xid not in ignored

    rows: list[EffectiveXid] = []
    for xid in sorted(set(table.listed()) | disabled | enabled):
        rule = table.rule(xid)
        acted = acts_on(xid)
        source = rule.source
        if acted and (rule.ignored or only is not None):  # acted on because DP_ENABLE_HEALTHCHECKS names it
            source = ENABLE_SWITCH
        elif not acted and not rule.ignored:
            source = DISABLE_SWITCH if xid in disabled else only_source
        rows.append(EffectiveXid(xid, rule.severity.value if acted else "ignored", rule.meaning, source))
    other = acts_on(-1)  # a number no table or switch names
    rows.append(EffectiveXid(None, UNKNOWN_XID.severity.value if other else "ignored", "any other XID",
                             UNKNOWN if other else only_source))
    return rows


def render_policy(rows: Sequence[EffectiveXid]) -> list[str]:
    """The rows as an aligned text table."""
    cells = [("XID", "CLASS", "REASON", "SOURCE")]
    cells += [("other" if r.xid is None else str(r.xid), r.effect, r.meaning, r.source) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(3)]
    return [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in cells]
