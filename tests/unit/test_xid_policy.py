"""The XID policy as data: the config file's overrides, the DP_* switches on top, the effective
table, the per-class quiet periods and the driver's GPU recovery action."""

from __future__ import annotations

from typing import Any

import pytest

from nvdp.config.load import load
from nvdp.config.options import XidOverride
from nvdp.core.health import EventKind as K
from nvdp.core.health import (
    FaultSource,
    HealthEvent,
    HealthState,
    ProbeSample,
    Scope,
    Severity,
    apply_event,
    apply_probe,
    effective_xids,
    fault_for_event,
    recovery_times,
    settings_from,
)
from nvdp.core.xid_policy import (
    CONFIG_FILE,
    ENABLE_SWITCH,
    RecoveryAction,
    XidTable,
    recovery_label,
    recovery_severity,
)
from nvdp.errors import ConfigError

A = "GPU-aaaa"
QUIET = 60.0
OK = ProbeSample(volatile_uncorrected=0, remap_pending=False, remap_failed=False, retired_pending=False)


def read(text: str) -> Any:
    return lambda path: text


def from_file(health: str, env: dict[str, str] | None = None, **cli: Any) -> Any:
    """A Config from a file whose flags.nvdp.health block is `health` (flow-style YAML)."""
    return load({"config_file": "/cfg.yaml", **cli}, env or {},
                read(f"version: v1\nflags:\n  nvdp:\n    health: {health}\n"))


def xid(number: int, action: int | None = None) -> HealthEvent:
    return HealthEvent(A, K.XID, xid=number, recovery_action=action)


# --- the config file's section -----------------------------------------------------------------


def test_overrides_are_read_in_every_spelling() -> None:
    cfg = from_file("{xids: {94: {class: fatal, reason: 'replace on first'}, '13': transient, 79: {class: ignored},"
                    " 4242: {class: transient}}}")
    assert cfg.xid_overrides == (
        XidOverride(13, "transient"), XidOverride(79, "ignored"), XidOverride(94, "fatal", "replace on first"),
        XidOverride(4242, "transient"),
    )
    table = XidTable(cfg.xid_overrides)
    assert (table.rule(94).severity, table.rule(94).meaning, table.rule(94).source) == (
        Severity.FATAL, "replace on first", CONFIG_FILE)
    assert table.rule(13).severity is Severity.TRANSIENT and not table.rule(13).ignored
    assert table.rule(79).ignored and table.rule(79).severity is Severity.FATAL  # kept for DP_ENABLE
    assert table.rule(4242).meaning == "no built-in meaning"
    assert table.ignored() == {31, 43, 45, 68, 79, 109}


H = "flags.nvdp.health"


@pytest.mark.parametrize(
    ("health", "field", "message"),
    [
        pytest.param("{xids: {94: {class: sometimes}}}", f"{H}.xids.94.class in /cfg.yaml",
                     "'sometimes' is not one of 'transient', 'fatal' or 'ignored'", id="unknown class"),
        pytest.param("{xids: {94: {reason: why}}}", f"{H}.xids.94.class in /cfg.yaml", "required, but not given",
                     id="class missing"),
        pytest.param("{xids: {ninety: fatal}}", f"{H}.xids.ninety in /cfg.yaml", "'ninety' is not an XID number",
                     id="key not a number"),
        pytest.param("{xids: {-1: fatal}}", f"{H}.xids.-1 in /cfg.yaml", "-1 is not an XID number",
                     id="negative XID"),
        pytest.param("{xids: {94: fatal, '94': transient}}", f"{H}.xids.94 in /cfg.yaml", "XID 94 is listed twice",
                     id="twice"),
        pytest.param("{xids: [94]}", f"{H}.xids in /cfg.yaml", "is not a mapping", id="a list"),
        pytest.param("{quietPeriod: 5, quietPeriods: {transient: 6}}", f"{H}.quietPeriods.transient in /cfg.yaml",
                     "give one of them", id="transient quiet period twice"),
        pytest.param("{quietPeriods: {ignored: 6}}", f"{H}.quietPeriods.ignored in /cfg.yaml", "no quiet period",
                     id="ignored has none"),
        pytest.param("{quietPeriods: {fatal: -3}}", f"{H}.quietPeriods.fatal in /cfg.yaml",
                     "not a number of seconds >= 0", id="negative fatal"),
    ],
)
def test_bad_sections_name_the_field(health: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_file(health)
    assert info.value.field == field
    assert message in str(info.value)


def test_quiet_periods_per_class_with_the_usual_precedence() -> None:
    settings = settings_from(from_file("{quietPeriods: {transient: 30, fatal: 3600}}"))
    assert (settings.quiet_period_s, settings.fatal_quiet_period_s) == (30.0, 3600.0)
    settings = settings_from(from_file("{quietPeriods: {transient: 30}}", {"NVDP_HEALTH_QUIET_PERIOD": "5"}))
    assert (settings.quiet_period_s, settings.fatal_quiet_period_s) == (5.0, None)  # env > file; fatal: never


def test_switches_stay_on_top_of_the_file() -> None:
    health = "{xids: {13: transient, 48: ignored}}"
    xids = settings_from(from_file(health)).switches.xids
    assert (xids.acts_on(13), xids.acts_on(48)) == (True, False)
    xids = settings_from(from_file(health, {"DP_DISABLE_HEALTHCHECKS": "13", "DP_ENABLE_HEALTHCHECKS": "48"})
                         ).switches.xids
    assert (xids.acts_on(13), xids.acts_on(48)) == (False, True)
    xids = settings_from(from_file(health, {"DP_ENABLE_HEALTHCHECKS": "all"})).switches.xids
    assert xids.acts_on(48) and xids.acts_on(31)


def test_effective_table_says_which_layer_decided() -> None:
    cfg = from_file("{xids: {94: {class: fatal, reason: mine}, 13: transient, 79: ignored}}",
                    {"DP_DISABLE_HEALTHCHECKS": "8", "DP_ENABLE_HEALTHCHECKS": "79"})
    rows = {r.xid: (r.effect, r.meaning, r.source) for r in effective_xids(cfg)}
    assert rows[94] == ("fatal", "mine", CONFIG_FILE)
    assert rows[13] == ("transient", "graphics engine exception", CONFIG_FILE)
    assert rows[79] == ("fatal", "GPU has fallen off the bus", ENABLE_SWITCH)
    assert rows[8][0::2] == ("ignored", "DP_DISABLE_HEALTHCHECKS")
    assert rows[31][0] == "ignored" and rows[48][0] == "fatal"
    assert rows[None][0] == "fatal"
    only = {r.xid: (r.effect, r.source) for r in effective_xids(load({}, {"DP_DISABLE_HEALTHCHECKS": "xids",
                                                                          "DP_ENABLE_HEALTHCHECKS": "48"}))}
    assert only[48] == ("fatal", ENABLE_SWITCH)
    assert only[79] == ("ignored", "DP_DISABLE_HEALTHCHECKS=xids")
    assert only[None] == ("ignored", "DP_DISABLE_HEALTHCHECKS=xids")


def test_an_override_changes_the_fault() -> None:
    settings = settings_from(from_file("{xids: {94: {class: fatal, reason: we replace these}}}"))
    fault = fault_for_event(xid(94), settings.switches.xids, 0.0, settings.table)
    assert fault is not None
    assert (fault.severity, fault.reason) == (Severity.FATAL, "XID 94: we replace these (fatal)")


# --- the driver's recovery action --------------------------------------------------------------


def test_recovery_action_names_and_classes() -> None:
    assert [recovery_label(a) for a in RecoveryAction] == [
        "none", "gpu-reset", "node-reboot", "drain-p2p", "drain-and-reset", "recover-imex-domain", "bus-reset",
        "system-reboot"]
    assert recovery_label(42) == "unknown-42"
    assert recovery_severity(0) is Severity.TRANSIENT
    assert {recovery_severity(a) for a in (1, 2, 3, 4, 5, 6, 7, 42)} == {Severity.FATAL}


@pytest.mark.parametrize(
    ("number", "action", "severity", "reason"),
    [
        pytest.param(94, 1, Severity.FATAL,
                     "XID 94: contained uncorrectable ECC error (fatal; the driver asks for gpu-reset)",
                     id="transient XID, the driver asks for a reset"),
        pytest.param(48, 0, Severity.TRANSIENT, "XID 48: double-bit ECC error (transient; the driver asks for none)",
                     id="fatal XID, the driver asks for nothing"),
        pytest.param(119, 2, Severity.FATAL, "XID 119: GSP RPC timeout (fatal; the driver asks for node-reboot)",
                     id="node reboot"),
        pytest.param(94, None, Severity.TRANSIENT, "XID 94: contained uncorrectable ECC error (transient)",
                     id="not reported: the table decides"),
    ],
)
def test_the_recovery_action_decides_the_class(number: int, action: int | None, severity: Severity,
                                               reason: str) -> None:
    fault = fault_for_event(xid(number, action), settings_from(load({}, {})).switches.xids, 0.0)
    assert fault is not None and (fault.severity, fault.reason) == (severity, reason)


def test_recovery_action_can_be_switched_off() -> None:
    settings = settings_from(load({}, {"NVDP_HEALTH_RECOVERY_ACTION": "false"}))
    fault = fault_for_event(xid(94, 1), settings.switches.xids, 0.0, settings.table, settings.use_recovery_action)
    assert fault is not None and fault.severity is Severity.TRANSIENT
    state = apply_probe(HealthState(), {A: ProbeSample(recovery_action=1)}, QUIET, 0.0, use_recovery_action=False)
    assert state.faults == {}


def test_the_probe_follows_the_recovery_action() -> None:
    xids = settings_from(load({}, {})).switches.xids
    state = apply_probe(HealthState(), {A: OK}, QUIET, 0.0)
    state = apply_event(state, xid(94, RecoveryAction.GPU_RESET), xids, now=1.0)
    reset = ProbeSample(volatile_uncorrected=0, recovery_action=RecoveryAction.GPU_RESET)
    state = apply_probe(state, {A: reset}, QUIET, 500.0)  # fatal: no quiet period clears it
    assert {f.source for f in state.faults.values()} == {FaultSource.XID, FaultSource.RECOVERY}
    recovery = next(f for f in state.faults.values() if f.source is FaultSource.RECOVERY)
    assert recovery.reason == "the driver asks for gpu-reset (GPU recovery action)"
    # The reset is done: the driver asks for nothing, the XID becomes transient and, long after
    # its last event, clears at once with the passing probe.
    state = apply_probe(state, {A: ProbeSample(volatile_uncorrected=0, recovery_action=0)}, QUIET, 501.0)
    assert state.faults == {}


def test_a_recovery_action_without_an_xid_marks_the_gpu_until_it_is_none() -> None:
    state = apply_probe(HealthState(), {A: ProbeSample(recovery_action=RecoveryAction.DRAIN_P2P)}, QUIET, 0.0)
    (fault,) = state.faults.values()
    assert (fault.source, fault.severity, fault.scope) == (FaultSource.RECOVERY, Severity.CONDITION, Scope(A))
    assert fault.reason == "the driver asks for drain-p2p (GPU recovery action)"
    again = apply_probe(state, {A: ProbeSample(recovery_action=RecoveryAction.DRAIN_P2P)}, QUIET, 5.0)
    assert again.faults == state.faults  # the same action: the same fault, not a new one each probe
    assert apply_probe(state, {A: ProbeSample(recovery_action=0)}, QUIET, 6.0).faults == {}


# --- the fatal class's quiet period ------------------------------------------------------------


def test_a_fatal_quiet_period_clears_fatal_xids_after_a_passing_probe() -> None:
    xids = settings_from(load({}, {})).switches.xids
    state = apply_event(apply_probe(HealthState(), {A: OK}, QUIET, 0.0), xid(79), xids, now=10.0)
    assert recovery_times(state, QUIET) == []
    assert recovery_times(state, QUIET, 100.0) == [110.0]
    assert apply_probe(state, {A: OK}, QUIET, 109.0, fatal_quiet_period_s=100.0).faults != {}
    assert apply_probe(state, {A: OK}, QUIET, 110.0, fatal_quiet_period_s=100.0).faults == {}
    assert apply_probe(state, {A: OK}, QUIET, 10_000.0).faults != {}  # without one: never


# --- NVML calls past their deadline ------------------------------------------------------------


def test_a_timed_out_probe_marks_the_gpu_and_keeps_the_last_real_sample() -> None:
    state = apply_probe(HealthState(), {A: OK}, QUIET, 0.0)
    hung = ProbeSample(reachable=False, timed_out=True, error="health probe of GPU-aaaa did not return within 10 s")
    state = apply_probe(state, {A: hung}, QUIET, 1.0)
    (fault,) = state.faults.values()
    assert (fault.source, fault.reason) == (
        FaultSource.TIMEOUT, "nvml-timeout: health probe of GPU-aaaa did not return within 10 s")
    assert state.samples[A] == OK  # the baseline is the last real answer
    state = apply_probe(state, {A: OK}, QUIET, 2.0)
    assert state.faults == {}
