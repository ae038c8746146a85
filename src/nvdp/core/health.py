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

The XID table is data (`xid_policy.py`: built-in, config-file overrides, the DP_* switches on
top, the driver's recovery action at run time); XIDs not in it are FATAL, as in the official
plugin, which never clears anything.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from nvdp.config.options import Config
from nvdp.config.parse import health_items
from nvdp.core.devices import Device, DeviceTree, GpuInfo, Health, Resource
from nvdp.core.xid_policy import (
    BUILTIN_TABLE,
    DEFAULT_IGNORED_XIDS,
    XID_POLICY,
    EffectiveXid,
    RecoveryAction,
    Severity,
    XidClass,
    XidTable,
    classify_xid,
    effective_policy,
    recovery_label,
    recovery_severity,
)

# The XID table moved to xid_policy.py; these names are still imported from here (re-exported).
__all__ = ["DEFAULT_IGNORED_XIDS", "XID_POLICY", "RecoveryAction", "Severity", "XidClass", "classify_xid"]


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


def check_switches(
    disable: Sequence[str], enable: Sequence[str], default_ignored: frozenset[int] = DEFAULT_IGNORED_XIDS
) -> CheckSwitches:
    """The official meanings, with one deliberate fix (docs/health.md has the full table):

    - nothing set: every check on, the `default_ignored` XIDs ignored (the official plugin's 13,
      31, 43, 45, 68, 109, unless the config file's XID policy changed them);
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
    return CheckSwitches(xids=XidFilter(ignored=frozenset((default_ignored | d.numbers) - e.numbers)))


@dataclass(frozen=True)
class HealthSettings:
    switches: CheckSwitches = field(default_factory=CheckSwitches)
    quiet_period_s: float = 60.0
    probe_interval_s: float = 10.0  # 0: no periodic probe (one still runs before a recovery)
    wait_error_threshold: int = 5  # consecutive event-wait failures before devices are marked
    table: XidTable = BUILTIN_TABLE  # the built-in XID table with the config file's overrides
    fatal_quiet_period_s: float | None = None  # None: a fatal XID clears only with a GPU reset
    use_recovery_action: bool = True  # the driver's GPU recovery action decides an XID's class
    nvml_timeout_s: float = 10.0  # deadline of every NVML call on the health path
    hygiene_threshold_bytes: int | None = None  # GPU hygiene on: memory in use above this is dirty

    @property
    def enabled(self) -> bool:
        return self.switches.events or self.switches.probes

    @property
    def periodic_probes(self) -> bool:
        return self.switches.probes and self.probe_interval_s > 0


def settings_from(cfg: Config) -> HealthSettings:
    table = XidTable(cfg.xid_overrides)
    return HealthSettings(
        switches=check_switches(cfg.disable_healthchecks, cfg.enable_healthchecks, table.ignored()),
        quiet_period_s=cfg.health_quiet_period,
        probe_interval_s=cfg.health_probe_interval,
        wait_error_threshold=cfg.health_wait_error_threshold,
        table=table,
        fatal_quiet_period_s=cfg.health_fatal_quiet_period,
        use_recovery_action=cfg.health_recovery_action,
        nvml_timeout_s=cfg.health_nvml_timeout,
        hygiene_threshold_bytes=cfg.gpu_hygiene_memory_threshold * 2**20 if cfg.gpu_hygiene else None,
    )


def effective_xids(cfg: Config) -> list[EffectiveXid]:
    """The XID table as it applies after the config file and the DP_* switches (`nvdp health policy`)."""
    table = XidTable(cfg.xid_overrides)
    switches = check_switches(cfg.disable_healthchecks, cfg.enable_healthchecks, table.ignored())
    d, e = health_items(cfg.disable_healthchecks), health_items(cfg.enable_healthchecks)
    word = "all" if "all" in d.words else "xids"
    return effective_policy(table, switches.xids.ignored, switches.xids.only, d.numbers, e.numbers,
                            only_source=f"DP_DISABLE_HEALTHCHECKS={word}")


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
    recovery_action: int | None = None  # what the driver asked for right after the event, where it says


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
    recovery_action: int | None = None  # NVML_FI_DEV_GET_GPU_RECOVERY_ACTION, where the driver reports it
    timed_out: bool = False  # the probe did not answer within its deadline (`error` says which call)
    dirty: str | None = None  # GPU hygiene: why the GPU is not clean; "": clean; None: not checked

    @property
    def passing(self) -> bool:
        return self.reachable and not self.remap_failed and not self.timed_out


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
    TIMEOUT = "nvml-timeout"  # an NVML call for this GPU (or a global one: every GPU) passed its deadline
    RECOVERY = "recovery-action"  # the driver asks for a recovery action (a reset, a reboot, a drain)
    DIRTY = "dirty"  # GPU hygiene: compute processes or memory left on an exclusive GPU


NVML_TIMEOUT = "nvml-timeout"  # the reason's first word for a call past its deadline


@dataclass(frozen=True)
class Fault:
    scope: Scope
    source: FaultSource
    severity: Severity
    reason: str
    xid: int | None = None
    last: float = 0.0  # when the last event for it arrived
    meaning: str = ""  # an XID's meaning, to rewrite the reason when its recovery action changes
    recovery_action: int | None = None  # the driver's recovery action that decided the severity

    @property
    def recovery_expected(self) -> bool:
        """Whether the fault clears by itself (transient, or a condition that may pass)."""
        return self.severity is not Severity.FATAL

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


def xid_reason(xid: int, meaning: str, severity: Severity, action: int | None) -> str:
    if action is None:
        return f"XID {xid}: {meaning} ({severity})"
    return f"XID {xid}: {meaning} ({severity}; the driver asks for {recovery_label(action)})"


def fault_for_event(
    event: HealthEvent, xids: XidFilter, now: float, table: XidTable = BUILTIN_TABLE, use_recovery_action: bool = True
) -> Fault | None:
    """The fault an event raises, or None when policy ignores it. Where the event carries the
    driver's recovery action (and `use_recovery_action`), that action decides the severity."""
    scope = Scope(event.gpu, event.gi, event.ci if event.gi is not None else None)
    if event.kind is EventKind.XID:
        if event.xid is None or not xids.acts_on(event.xid):
            return None
        cls = table.rule(event.xid)
        action = event.recovery_action if use_recovery_action else None
        severity = cls.severity if action is None else recovery_severity(action)
        reason = xid_reason(event.xid, cls.meaning, severity, action)
        return Fault(scope, FaultSource.XID, severity, reason, event.xid, now, cls.meaning, action)
    if event.kind is EventKind.ECC_UNCORRECTED:
        return Fault(scope, FaultSource.ECC, Severity.TRANSIENT, "uncorrectable ECC error event (transient)", None, now)
    return None


def apply_event(
    state: HealthState, event: HealthEvent, xids: XidFilter, now: float, table: XidTable = BUILTIN_TABLE,
    use_recovery_action: bool = True,
) -> HealthState:
    """Fold one event into the state; `state` itself comes back when policy ignores the event."""
    fault = fault_for_event(event, xids, now, table, use_recovery_action)
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
    state: HealthState,
    samples: Mapping[str, ProbeSample],
    quiet_period_s: float,
    now: float,
    fatal_quiet_period_s: float | None = None,
    use_recovery_action: bool = True,
) -> HealthState:
    """Fold one probe round into the state: lost GPUs, resets, ECC rises, the driver's recovery
    action, NVML calls past their deadline, and faults whose quiet period is over on a GPU that
    passed this probe (transient ones; fatal XIDs too when `fatal_quiet_period_s` is set).

    A sample that timed out raises an `nvml-timeout` fault and is not kept as the GPU's baseline:
    the next real answer is compared with the last real one."""
    faults = dict(state.faults)
    kept: dict[str, ProbeSample] = {}
    for gpu, sample in samples.items():
        scope = Scope(gpu)
        timeout = Fault(scope, FaultSource.TIMEOUT, Severity.CONDITION, "", None, now)
        if sample.timed_out:
            faults.setdefault(timeout.key, replace(timeout, reason=f"{NVML_TIMEOUT}: {sample.error}"))
            continue
        faults.pop(timeout.key, None)
        kept[gpu] = sample
        before = state.samples.get(gpu)
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
        if use_recovery_action and sample.reachable and sample.recovery_action is not None:
            faults = _follow_recovery_action(faults, gpu, sample.recovery_action, now)
        if sample.dirty is not None:
            dirty = Fault(scope, FaultSource.DIRTY, Severity.CONDITION, f"dirty: {sample.dirty}", None, now)
            current = faults.get(dirty.key)
            if sample.dirty and (current is None or current.reason != dirty.reason):
                faults[dirty.key] = dirty
            elif not sample.dirty:
                faults.pop(dirty.key, None)
        if sample.passing:
            faults = {k: f for k, f in faults.items()
                      if not (f.scope.gpu == gpu and _quiet_over(f, now, quiet_period_s, fatal_quiet_period_s))}
    return HealthState(faults=faults, samples={**state.samples, **kept})


def _quiet_over(fault: Fault, now: float, quiet_period_s: float, fatal_quiet_period_s: float | None) -> bool:
    if fault.severity is Severity.TRANSIENT:
        return now >= fault.last + quiet_period_s
    if fault.severity is Severity.FATAL and fault.source is FaultSource.XID and fatal_quiet_period_s is not None:
        return now >= fault.last + fatal_quiet_period_s
    return False


def _follow_recovery_action(
    faults: dict[tuple[Scope, FaultSource, int | None], Fault], gpu: str, action: int, now: float
) -> dict[tuple[Scope, FaultSource, int | None], Fault]:
    """The driver's current recovery action for a GPU: XID faults it decided take the class of
    the new action (a reset done turns "gpu-reset" into "none": the fault becomes transient), and
    an action other than none is a condition of its own, so a GPU that needs a reset is marked
    even when the XID that said so came before the plugin started."""
    out = {}
    for key, fault in faults.items():
        if (fault.scope.gpu == gpu and fault.source is FaultSource.XID and fault.recovery_action is not None
                and fault.recovery_action != action and fault.xid is not None):
            severity = recovery_severity(action)
            fault = replace(fault, severity=severity, recovery_action=action,
                            reason=xid_reason(fault.xid, fault.meaning, severity, action))
        out[key] = fault
    asked = Fault(Scope(gpu), FaultSource.RECOVERY, Severity.CONDITION,
                  f"the driver asks for {recovery_label(action)} (GPU recovery action)", None, now,
                  recovery_action=action)
    if action == RecoveryAction.NONE:
        out.pop(asked.key, None)
    elif out.get(asked.key) is None or out[asked.key].recovery_action != action:
        out[asked.key] = asked
    return out


def forget_gpus(state: HealthState, present: Iterable[str]) -> HealthState:
    """Drop what we know about GPUs that discovery no longer reports (after a reload)."""
    keep = set(present)
    return HealthState(
        faults={k: f for k, f in state.faults.items() if f.scope.gpu is None or f.scope.gpu in keep},
        samples={g: s for g, s in state.samples.items() if g in keep},
    )


def recovery_times(state: HealthState, quiet_period_s: float, fatal_quiet_period_s: float | None = None) -> list[float]:
    """When each transient fault (and, with a fatal quiet period, each fatal XID) may clear: a
    probe of its GPU is due then."""
    times = [f.last + quiet_period_s for f in state.faults.values() if f.severity is Severity.TRANSIENT]
    if fatal_quiet_period_s is not None:
        times += [f.last + fatal_quiet_period_s for f in state.faults.values()
                  if f.severity is Severity.FATAL and f.source is FaultSource.XID]
    return times


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


# ---------------------------------------------------------------------------------------------
# Per GPU (what the cluster sees: docs/health.md "What the cluster sees")


@dataclass(frozen=True)
class GpuHealth:
    """One physical GPU's health: Unhealthy when any fault is about it (or about every GPU); the
    fault that explains it is the one that lasts longest (as for devices)."""

    uuid: str
    index: int
    healthy: bool = True
    reason: str = ""
    xid: int | None = None
    severity: Severity | None = None
    recovery_expected: bool = True  # False for a fatal fault: it needs a reset (or a reboot)


def gpu_health(state: HealthState, gpus: Iterable[GpuInfo]) -> tuple[GpuHealth, ...]:
    out = []
    for gpu in gpus:
        found = [f for f in state.faults.values() if f.scope.gpu in (None, gpu.uuid)]
        if not found:
            out.append(GpuHealth(gpu.uuid, gpu.index))
            continue
        top = sorted(found, key=lambda f: (_RANK[f.severity], -f.last))[0]
        out.append(GpuHealth(gpu.uuid, gpu.index, False, top.reason, top.xid, top.severity, top.recovery_expected))
    return tuple(out)
