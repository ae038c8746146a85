"""Health policy: which events make which devices unhealthy, and when they become healthy again.

Pure: no NVML, no gRPC, no clock, no logging. Backends report `HealthEvent`s (from an event
wait) and `ProbeSample`s (from a periodic probe); the functions here fold them into an immutable
`HealthState`, and `overlay` applies that state to a freshly discovered `DeviceTree`. Nothing is
mutated: every change builds a new state and a new tree.

A fault has a scope (one GPU, optionally one GPU/compute instance of it, or every GPU) and a
severity that says how it clears:

- TRANSIENT: after `quiet_period_s` without a new event for it, once a probe of the GPU passes;
- FATAL: when the GPU is reset (a probe sees it come back after being lost, or its volatile
  ECC counter drop), or when the plugin restarts;
- CONDITION: as soon as the check that raised it passes again (a lost GPU answers, the event
  wait works again, a row-remapping failure is gone).

The XID table below is the documented policy (docs/health.md); XIDs not in it are FATAL, as in
the official plugin, which never clears anything.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from nvdp.config.options import Config
from nvdp.config.parse import health_items
from nvdp.core.devices import Device, DeviceTree, Health, Resource

# The official plugin's default ignore set (application errors, not GPU faults).
DEFAULT_IGNORED_XIDS = frozenset({13, 31, 43, 45, 68, 109})


class Severity(enum.StrEnum):
    TRANSIENT = "transient"
    FATAL = "fatal"
    CONDITION = "condition"


@dataclass(frozen=True)
class XidClass:
    meaning: str
    severity: Severity


_T, _F = Severity.TRANSIENT, Severity.FATAL

# Our reading of NVIDIA's XID catalog (Ampere and later). TRANSIENT: the error ends with the
# application that caused it, or the driver contained it, and the GPU keeps working. FATAL: the
# catalog's answer is a GPU reset (or worse). See docs/health.md for the reasoning per row.
XID_POLICY: Mapping[int, XidClass] = {
    8: XidClass("GPU stopped processing (channel idle timeout)", _T),
    13: XidClass("graphics engine exception", _T),
    31: XidClass("GPU memory page fault", _T),
    32: XidClass("invalid or corrupted push buffer stream", _T),
    43: XidClass("GPU stopped processing (application error)", _T),
    45: XidClass("preemptive cleanup after an earlier error", _T),
    48: XidClass("double-bit ECC error", _F),
    62: XidClass("internal micro-controller halt", _F),
    63: XidClass("ECC page retirement or row remapping recorded", _T),
    64: XidClass("ECC page retirement or row remapping failed", _F),
    68: XidClass("video decoder exception", _T),
    69: XidClass("graphics engine class error", _T),
    74: XidClass("NVLink error", _F),
    79: XidClass("GPU has fallen off the bus", _F),
    92: XidClass("high single-bit ECC error rate", _T),
    94: XidClass("contained uncorrectable ECC error", _T),
    95: XidClass("uncontained uncorrectable ECC error", _F),
    109: XidClass("context switch timeout", _T),
    119: XidClass("GSP RPC timeout", _F),
    120: XidClass("GSP error", _F),
    154: XidClass("GPU recovery action changed (reset or reboot required)", _F),
}


def classify_xid(xid: int) -> XidClass:
    return XID_POLICY.get(xid, XidClass("unknown XID", Severity.FATAL))


# ---------------------------------------------------------------------------------------------
# Settings: DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS and nvdp's own knobs


@dataclass(frozen=True)
class XidFilter:
    """Which XIDs are acted on: every XID except `ignored`, or only `only` when it is set."""

    ignored: frozenset[int] = DEFAULT_IGNORED_XIDS
    only: frozenset[int] | None = None

    def acts_on(self, xid: int) -> bool:
        return xid in self.only if self.only is not None else xid not in self.ignored


@dataclass(frozen=True)
class CheckSwitches:
    """What DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS leave switched on."""

    events: bool = True  # wait on NVML events (XIDs, ECC events)
    probes: bool = True  # the periodic NVML probe (lost GPU, ECC counters, row remapping)
    xids: XidFilter = field(default_factory=XidFilter)


def check_switches(disable: Sequence[str], enable: Sequence[str]) -> CheckSwitches:
    """The official meanings, with one deliberate fix (docs/health.md has the full table):

    - nothing set: every check on, XIDs 13, 31, 43, 45, 68, 109 ignored;
    - DISABLE=<n,...>: those XIDs are ignored too; ENABLE=<n,...>: those are not ignored
      (defaults included), ENABLE wins over DISABLE for the same number;
    - ENABLE=all: nothing ignored, and it overrides DISABLE=all;
    - DISABLE=all or DISABLE=xids (the same, as upstream): no check at all; with ENABLE=<n,...>
      (the official plugin still disables everything) only those XIDs are watched.

    Malformed entries are ignored, as upstream (config loading warns about each one).
    """
    d, e = health_items(disable), health_items(enable)
    if e.words:  # "all" (or "xids") re-enables every XID and every check
        return CheckSwitches(xids=XidFilter(ignored=frozenset()))
    if d.words:  # "all" or "xids"
        if not e.numbers:
            return CheckSwitches(events=False, probes=False, xids=XidFilter(only=frozenset()))
        return CheckSwitches(events=True, probes=False, xids=XidFilter(only=e.numbers))
    return CheckSwitches(xids=XidFilter(ignored=frozenset((DEFAULT_IGNORED_XIDS | d.numbers) - e.numbers)))


@dataclass(frozen=True)
class HealthSettings:
    switches: CheckSwitches = field(default_factory=CheckSwitches)
    quiet_period_s: float = 60.0
    probe_interval_s: float = 10.0  # 0: no periodic probe (one still runs before a recovery)
    wait_error_threshold: int = 5  # consecutive event-wait failures before devices are marked

    @property
    def enabled(self) -> bool:
        return self.switches.events or self.switches.probes

    @property
    def periodic_probes(self) -> bool:
        return self.switches.probes and self.probe_interval_s > 0


def settings_from(cfg: Config) -> HealthSettings:
    return HealthSettings(
        switches=check_switches(cfg.disable_healthchecks, cfg.enable_healthchecks),
        quiet_period_s=cfg.health_quiet_period,
        probe_interval_s=cfg.health_probe_interval,
        wait_error_threshold=cfg.health_wait_error_threshold,
    )


# ---------------------------------------------------------------------------------------------
# What backends report


class EventKind(enum.StrEnum):
    XID = "xid"
    ECC_UNCORRECTED = "ecc"  # NVML double-bit ECC event
    ECC_CORRECTED = "ecc-corrected"  # NVML single-bit ECC event: logged, never acted on


@dataclass(frozen=True)
class HealthEvent:
    """One event from a backend's event wait. gi/ci are set when the event names a MIG
    GPU instance / compute instance (NVML reports 0xFFFFFFFF for "none")."""

    gpu: str  # GPU UUID
    kind: EventKind
    xid: int | None = None
    gi: int | None = None
    ci: int | None = None


@dataclass(frozen=True)
class ProbeSample:
    """One GPU as the periodic probe saw it. A counter is None when the GPU does not report it."""

    reachable: bool = True
    lost: bool = False  # GPU_IS_LOST, or no handle for the UUID: the GPU is gone from the bus
    error: str = ""  # why it is unreachable
    volatile_uncorrected: int | None = None  # volatile uncorrectable ECC errors since the last reset
    remap_pending: bool | None = None
    remap_failed: bool | None = None
    retired_pending: bool | None = None

    @property
    def passing(self) -> bool:
        return self.reachable and not self.remap_failed


# ---------------------------------------------------------------------------------------------
# The state


@dataclass(frozen=True)
class Scope:
    """The devices a fault covers: every device of `gpu` (every GPU when None), narrowed to one
    MIG GPU instance (and compute instance) when `gi` (and `ci`) are set."""

    gpu: str | None
    gi: int | None = None
    ci: int | None = None

    def covers(self, device: Device) -> bool:
        if self.gpu is not None and device.gpu_uuid != self.gpu:
            return False
        if self.gi is None or device.mig is None:
            return True  # unscoped, or a full-GPU device (it contains every instance)
        return device.mig.gi_id == self.gi and (self.ci is None or device.mig.ci_id == self.ci)


class FaultSource(enum.StrEnum):
    """What raised a fault: it decides which check may clear it."""

    XID = "xid"  # an XID event
    ECC = "ecc"  # an uncorrectable ECC event, or the probe's ECC counter rising
    LOST = "lost"  # the probe cannot reach the GPU
    REMAP_FAILED = "remap-failed"  # the probe sees a failed row remapping
    WAIT = "wait"  # the event wait keeps failing (every GPU)
    REGISTER = "register"  # the GPU's events could not be registered


@dataclass(frozen=True)
class Fault:
    scope: Scope
    source: FaultSource
    severity: Severity
    reason: str
    xid: int | None = None
    last: float = 0.0  # when the last event for it arrived

    @property
    def key(self) -> tuple[Scope, FaultSource, int | None]:
        return (self.scope, self.source, self.xid)


# Which fault explains a device when several cover it: the one that lasts longest.
_RANK = {Severity.FATAL: 0, Severity.CONDITION: 1, Severity.TRANSIENT: 2}


@dataclass(frozen=True)
class HealthState:
    faults: Mapping[tuple[Scope, FaultSource, int | None], Fault] = field(default_factory=dict)
    samples: Mapping[str, ProbeSample] = field(default_factory=dict)  # last probe per GPU

    def covering(self, device: Device) -> list[Fault]:
        found = [f for f in self.faults.values() if f.scope.covers(device)]
        return sorted(found, key=lambda f: (_RANK[f.severity], -f.last))

    def for_gpu(self, gpu: str) -> list[Fault]:
        return [f for f in self.faults.values() if f.scope.gpu == gpu]


def add_fault(state: HealthState, fault: Fault) -> HealthState:
    return replace(state, faults={**state.faults, fault.key: fault})


def drop_faults(state: HealthState, keep: Callable[[Fault], bool]) -> HealthState:
    faults = {k: f for k, f in state.faults.items() if keep(f)}
    return state if len(faults) == len(state.faults) else replace(state, faults=faults)


def fault_for_event(event: HealthEvent, xids: XidFilter, now: float) -> Fault | None:
    """The fault an event raises, or None when policy ignores it."""
    scope = Scope(event.gpu, event.gi, event.ci if event.gi is not None else None)
    if event.kind is EventKind.XID:
        if event.xid is None or not xids.acts_on(event.xid):
            return None
        cls = classify_xid(event.xid)
        reason = f"XID {event.xid}: {cls.meaning} ({cls.severity})"
        return Fault(scope, FaultSource.XID, cls.severity, reason, event.xid, now)
    if event.kind is EventKind.ECC_UNCORRECTED:
        return Fault(scope, FaultSource.ECC, Severity.TRANSIENT, "uncorrectable ECC error event (transient)", None, now)
    return None


def apply_event(state: HealthState, event: HealthEvent, xids: XidFilter, now: float) -> HealthState:
    """Fold one event into the state; `state` itself comes back when policy ignores the event."""
    fault = fault_for_event(event, xids, now)
    return state if fault is None else add_fault(state, fault)


def apply_wait_result(
    state: HealthState, failures: int, error: str, threshold: int, now: float
) -> HealthState:
    """Event-wait outcome: `failures` consecutive failures so far (0: the wait works again)."""
    if failures == 0:
        return drop_faults(state, lambda f: f.source is not FaultSource.WAIT)
    if failures < threshold:
        return state
    # The reason does not carry the running count, so a storm is one transition, not one per failure.
    reason = f"NVML event wait failed {threshold}+ times in a row: {error}"
    fault = Fault(Scope(None), FaultSource.WAIT, Severity.CONDITION, reason, None, now)
    current = state.faults.get(fault.key)
    return state if current is not None and current.reason == reason else add_fault(state, fault)


def _reset_seen(before: ProbeSample | None, now: ProbeSample) -> bool:
    """A GPU reset shows as a lost GPU answering again, or as volatile ECC counters that dropped
    (only a reset or a driver reload clears them)."""
    if before is None or not now.reachable:
        return False
    if before.lost:
        return True
    return (
        before.volatile_uncorrected is not None
        and now.volatile_uncorrected is not None
        and now.volatile_uncorrected < before.volatile_uncorrected
    )


def _rose(before: ProbeSample | None, now: ProbeSample) -> str | None:
    """Why this sample shows a new memory error since the previous one (None: it does not)."""
    if before is None or not before.reachable or not now.reachable:
        return None
    if (
        before.volatile_uncorrected is not None
        and now.volatile_uncorrected is not None
        and now.volatile_uncorrected > before.volatile_uncorrected
    ):
        return (
            f"volatile uncorrectable ECC errors rose from {before.volatile_uncorrected} "
            f"to {now.volatile_uncorrected}"
        )
    if now.remap_pending and before.remap_pending is False:
        return "a row remapping became pending"
    if now.retired_pending and before.retired_pending is False:
        return "a page retirement became pending"
    return None


def apply_probe(
    state: HealthState, samples: Mapping[str, ProbeSample], quiet_period_s: float, now: float
) -> HealthState:
    """Fold one probe round into the state: lost GPUs, resets, ECC rises, and transient faults
    whose quiet period is over on a GPU that passed this probe."""
    faults = dict(state.faults)
    for gpu, sample in samples.items():
        before = state.samples.get(gpu)
        scope = Scope(gpu)
        if _reset_seen(before, sample):
            faults = {k: f for k, f in faults.items() if not (f.scope.gpu == gpu and f.severity is Severity.FATAL)}
        lost = Fault(scope, FaultSource.LOST, Severity.CONDITION, "", None, now)
        if sample.reachable:
            faults.pop(lost.key, None)
        else:
            what = "GPU is lost" if sample.lost else "NVML cannot reach the GPU"
            faults[lost.key] = replace(lost, reason=f"{what}: {sample.error}")
        failed = Fault(
            scope, FaultSource.REMAP_FAILED, Severity.CONDITION, "row remapping failed (the GPU needs service)"
        )
        if sample.reachable and sample.remap_failed:
            faults.setdefault(failed.key, replace(failed, last=now))
        elif sample.reachable:
            faults.pop(failed.key, None)
        rise = _rose(before, sample)
        if rise is not None:
            ecc = Fault(scope, FaultSource.ECC, Severity.TRANSIENT, f"{rise} (transient)", None, now)
            faults[ecc.key] = ecc
        if sample.passing:
            faults = {
                k: f
                for k, f in faults.items()
                if not (f.scope.gpu == gpu and f.severity is Severity.TRANSIENT and now >= f.last + quiet_period_s)
            }
    return HealthState(faults=faults, samples={**state.samples, **samples})


def forget_gpus(state: HealthState, present: Iterable[str]) -> HealthState:
    """Drop what we know about GPUs that discovery no longer reports (after a reload)."""
    keep = set(present)
    return HealthState(
        faults={k: f for k, f in state.faults.items() if f.scope.gpu is None or f.scope.gpu in keep},
        samples={g: s for g, s in state.samples.items() if g in keep},
    )


def recovery_times(state: HealthState, quiet_period_s: float) -> list[float]:
    """When each transient fault may clear (a probe of its GPU is due then)."""
    return [f.last + quiet_period_s for f in state.faults.values() if f.severity is Severity.TRANSIENT]


# ---------------------------------------------------------------------------------------------
# Trees


def overlay(tree: DeviceTree, state: HealthState) -> DeviceTree:
    """The discovered tree with every covered device marked Unhealthy (and why). Every replica
    and every MIG device of a GPU is covered by an unscoped fault on that GPU."""
    if not state.faults:
        return tree
    out: dict[str, Resource] = {}
    for name, resource in tree.items():
        devices = []
        for device in resource.devices:
            faults = state.covering(device)
            devices.append(device.with_health(Health.UNHEALTHY, faults[0].reason) if faults else device)
        out[name] = Resource(name, tuple(devices))
    return out


@dataclass(frozen=True)
class Transition:
    resource: str
    device: str
    health: Health
    reason: str
    xid: int | None


def transitions(old: DeviceTree, new: DeviceTree, state: HealthState) -> list[Transition]:
    """Devices present in both trees whose health or reason changed."""
    out = []
    for name, resource in new.items():
        before = old.get(name)
        if before is None:
            continue
        for device in resource.devices:
            previous = before.by_id.get(device.id)
            if previous is None or (previous.health, previous.reason) == (device.health, device.reason):
                continue
            faults = state.covering(device) if not device.healthy else []
            xid = faults[0].xid if faults else None
            out.append(Transition(name, device.id, device.health, device.reason, xid))
    return out
