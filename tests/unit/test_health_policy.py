"""The pure health policy: check switches, XID classes, scopes, recovery, probes, trees."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvdp.core.devices import Device, DeviceTree, Health, MigInfo, Resource
from nvdp.core.health import (
    DEFAULT_IGNORED_XIDS,
    XID_POLICY,
    EventKind,
    Fault,
    HealthEvent,
    HealthState,
    ProbeSample,
    Scope,
    Severity,
    XidFilter,
    apply_event,
    apply_probe,
    apply_wait_result,
    check_switches,
    classify_xid,
    forget_gpus,
    overlay,
    recovery_times,
    transitions,
)

A, B, C = "GPU-aaaa", "GPU-bbbb", "GPU-cccc"
QUIET = 60.0
ALL_XIDS = XidFilter(ignored=frozenset())


def mig(gi: int, ci: int) -> MigInfo:
    return MigInfo(slot=gi, uuid=f"MIG-c-{gi}-{ci}", gi_id=gi, ci_id=ci, gi_slices=1, ci_slices=1, memory_mb=10240)


def node_tree() -> DeviceTree:
    """A: a full GPU; B: four time-sliced replicas; C: three MIG devices (GI 1/CI 0, GI 2/CI 0, GI 2/CI 1)."""
    full = Device(id=A, gpu_uuid=A, index="0", paths=("/dev/nvidia0",))
    replicas = tuple(
        Device(id=f"{B}::{n}", gpu_uuid=B, index="1", paths=("/dev/nvidia1",), replica=n) for n in range(4)
    )
    migs = tuple(
        Device(id=m.uuid, gpu_uuid=C, index=f"2:{i}", paths=("/dev/nvidia2",), mig=m)
        for i, m in enumerate([mig(1, 0), mig(2, 0), mig(2, 1)])
    )
    return {
        "nvidia.com/gpu": Resource("nvidia.com/gpu", (full,)),
        "nvidia.com/gpu.shared": Resource("nvidia.com/gpu.shared", replicas),
        "nvidia.com/mig-1g.10gb": Resource("nvidia.com/mig-1g.10gb", migs),
    }


def unhealthy_ids(tree: DeviceTree) -> set[str]:
    return {d.id for r in tree.values() for d in r.devices if not d.healthy}


def xid(gpu: str, number: int, gi: int | None = None, ci: int | None = None) -> HealthEvent:
    return HealthEvent(gpu, EventKind.XID, xid=number, gi=gi, ci=ci)


OK = ProbeSample(volatile_uncorrected=0, remap_pending=False, remap_failed=False, retired_pending=False)
LOST = ProbeSample(reachable=False, lost=True, error="GPU is lost")


# --- DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS ------------------------------------------

SAMPLE_XIDS = (11, 13, 31, 48, 63, 79, 109)


@pytest.mark.parametrize(
    ("disable", "enable", "events", "probes", "acted_on"),
    [
        pytest.param([], [], True, True, {11, 48, 63, 79}, id="nothing set: the default ignore set"),
        pytest.param(["all"], [], False, False, set(), id="disable=all: nothing runs"),
        pytest.param(["xids"], [], False, False, set(), id="disable=xids: as all, nothing runs (upstream)"),
        pytest.param([], ["all"], True, True, set(SAMPLE_XIDS), id="enable=all: nothing ignored"),
        pytest.param(["all"], ["all"], True, True, set(SAMPLE_XIDS), id="enable=all overrides disable=all"),
        pytest.param(["11"], ["11"], True, True, {11, 48, 63, 79}, id="disable=11 enable=11: 11 acted on"),
        pytest.param(["48", "63"], [], True, True, {11, 79}, id="disable numbers add to the defaults"),
        pytest.param([], ["13"], True, True, {11, 13, 48, 63, 79}, id="enable removes a default"),
        pytest.param(["all"], ["48"], True, False, {48}, id="disable=all enable=48: only 48 (official: nothing)"),
        pytest.param(["xids"], ["79"], True, False, {79}, id="disable=xids enable=79: only 79, as with all"),
        pytest.param(["48", "all"], [], False, False, set(), id="all wins over numbers in one list"),
        pytest.param([" ALL "], [], False, False, set(), id="case and spaces as upstream"),
        pytest.param(["", " "], [""], True, True, {11, 48, 63, 79}, id="empty items are skipped"),
    ],
)
def test_check_switches(
    disable: list[str], enable: list[str], events: bool, probes: bool, acted_on: set[int]
) -> None:
    switches = check_switches(disable, enable)
    assert (switches.events, switches.probes) == (events, probes)
    assert {x for x in SAMPLE_XIDS if switches.xids.acts_on(x)} == acted_on


@pytest.mark.parametrize(
    ("disable", "enable", "acted_on"),
    [
        pytest.param(["48", "abc"], [], {11, 63, 79}, id="word in disable: ignored, 48 applies"),
        pytest.param([], ["-1"], {11, 48, 63, 79}, id="negative in enable: ignored"),
        pytest.param([], ["4.5", "13"], {11, 13, 48, 63, 79}, id="not an integer: ignored, 13 applies"),
    ],
)
def test_check_switches_ignores_garbage_as_upstream(disable: list[str], enable: list[str], acted_on: set[int]) -> None:
    switches = check_switches(disable, enable)
    assert {x for x in SAMPLE_XIDS if switches.xids.acts_on(x)} == acted_on


# --- XID classes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "severity"),
    [
        pytest.param(48, Severity.FATAL, id="48 double-bit ECC"),
        pytest.param(63, Severity.TRANSIENT, id="63 remap recorded"),
        pytest.param(64, Severity.FATAL, id="64 remap failed"),
        pytest.param(74, Severity.FATAL, id="74 NVLink"),
        pytest.param(79, Severity.FATAL, id="79 fallen off the bus"),
        pytest.param(92, Severity.TRANSIENT, id="92 high SBE rate"),
        pytest.param(94, Severity.TRANSIENT, id="94 contained ECC"),
        pytest.param(95, Severity.FATAL, id="95 uncontained ECC"),
        pytest.param(119, Severity.FATAL, id="119 GSP RPC timeout"),
        pytest.param(120, Severity.FATAL, id="120 GSP error"),
        pytest.param(4242, Severity.FATAL, id="unknown XIDs are fatal"),
    ],
)
def test_xid_classes(number: int, severity: Severity) -> None:
    assert classify_xid(number).severity is severity


def test_default_ignored_xids_are_in_the_table() -> None:
    assert {13, 31, 43, 45, 68, 109} == DEFAULT_IGNORED_XIDS
    assert set(XID_POLICY) >= DEFAULT_IGNORED_XIDS


# --- scopes: every device of a GPU, or one MIG instance ----------------------------------------


@pytest.mark.parametrize(
    ("event", "marked"),
    [
        pytest.param(xid(A, 79), {A}, id="full GPU"),
        pytest.param(xid(B, 79), {f"{B}::{n}" for n in range(4)}, id="every replica (official: one)"),
        pytest.param(xid(C, 79), {"MIG-c-1-0", "MIG-c-2-0", "MIG-c-2-1"}, id="unscoped: every MIG device"),
        pytest.param(xid(C, 79, gi=2, ci=1), {"MIG-c-2-1"}, id="GI 2 CI 1: that MIG device only"),
        pytest.param(xid(C, 79, gi=2), {"MIG-c-2-0", "MIG-c-2-1"}, id="GI 2 without CI: its compute instances"),
        pytest.param(xid(C, 79, gi=5, ci=0), set(), id="GI that has no device: nothing"),
        pytest.param(xid(A, 79, gi=1, ci=0), {A}, id="instance on a full-GPU device: the GPU holds it"),
        pytest.param(xid("GPU-unknown", 79), set(), id="unknown GPU: nothing"),
        pytest.param(xid(A, 13), set(), id="ignored XID: nothing"),
        pytest.param(HealthEvent(B, EventKind.ECC_UNCORRECTED), {f"{B}::{n}" for n in range(4)}, id="DBE event"),
        pytest.param(HealthEvent(B, EventKind.ECC_CORRECTED), set(), id="SBE event: logged only"),
    ],
)
def test_event_scope(event: HealthEvent, marked: set[str]) -> None:
    before = HealthState()
    state = apply_event(before, event, XidFilter(), now=0.0)
    # The monitor logs "ignored by policy" when the same state object comes back.
    ignored = event.kind is EventKind.ECC_CORRECTED or (event.xid is not None and event.xid == 13)
    assert (state is before) == ignored
    tree = overlay(node_tree(), state)
    assert unhealthy_ids(tree) == marked
    for resource in tree.values():
        for device in resource.devices:
            assert bool(device.reason) == (device.id in marked)


def test_overlay_keeps_ids_order_and_other_fields() -> None:
    state = apply_event(HealthState(), xid(C, 48, gi=1, ci=0), XidFilter(), now=0.0)
    before, after = node_tree(), overlay(node_tree(), state)
    assert list(before) == list(after)
    for name in before:
        assert [d.id for d in before[name].devices] == [d.id for d in after[name].devices]
        for old, new in zip(before[name].devices, after[name].devices, strict=True):
            assert replace(new, health=Health.HEALTHY, reason="") == old
    (device,) = [d for d in after["nvidia.com/mig-1g.10gb"].devices if not d.healthy]
    assert device.reason == "XID 48: double-bit ECC error (fatal)"


def test_node_wide_fault_marks_everything_and_fatal_explains_first() -> None:
    state = apply_event(HealthState(), xid(A, 94), XidFilter(), now=5.0)
    state = apply_wait_result(state, failures=3, error="Unknown Error", threshold=3, now=6.0)
    state = apply_event(state, xid(A, 79), XidFilter(), now=7.0)
    tree = overlay(node_tree(), state)
    assert unhealthy_ids(tree) == {d.id for r in tree.values() for d in r.devices}
    assert tree["nvidia.com/gpu"].devices[0].reason.startswith("XID 79")
    assert tree["nvidia.com/gpu.shared"].devices[0].reason.startswith("NVML event wait failed 3+ times")


# --- recovery ------------------------------------------------------------------------------------


def probe(state: HealthState, now: float, **samples: ProbeSample) -> HealthState:
    gpus = {"a": A, "b": B, "c": C}
    return apply_probe(state, {gpus[k]: v for k, v in samples.items()}, QUIET, now)


def test_transient_xid_clears_after_the_quiet_period_with_a_passing_probe() -> None:
    state = probe(HealthState(), 0.0, a=OK)
    state = apply_event(state, xid(A, 94), XidFilter(), now=10.0)
    assert recovery_times(state, QUIET) == [70.0]
    assert unhealthy_ids(overlay(node_tree(), probe(state, 69.9, a=OK))) == {A}
    state = apply_event(state, xid(A, 94), XidFilter(), now=50.0)  # a new event restarts the quiet period
    assert unhealthy_ids(overlay(node_tree(), probe(state, 70.0, a=OK))) == {A}
    assert unhealthy_ids(overlay(node_tree(), probe(state, 109.9, a=OK))) == {A}
    assert unhealthy_ids(overlay(node_tree(), probe(state, 110.0, a=OK))) == set()


def test_transient_xid_needs_a_passing_probe_of_its_gpu() -> None:
    state = apply_event(probe(HealthState(), 0.0, a=OK), xid(A, 94), XidFilter(), now=0.0)
    assert unhealthy_ids(overlay(node_tree(), probe(state, 100.0, b=OK))) == {A}  # another GPU's probe
    failing = probe(state, 100.0, a=LOST)
    assert {f.source for f in failing.faults.values()} == {"xid", "lost"}
    remap_failed = replace(OK, remap_failed=True)
    assert "xid" in {f.source for f in probe(state, 100.0, a=remap_failed).faults.values()}


def test_fatal_xid_stays_until_the_gpu_is_reset() -> None:
    state = apply_event(probe(HealthState(), 0.0, a=OK), xid(A, 79), XidFilter(), now=1.0)
    for t in (100.0, 1000.0, 10000.0):
        state = probe(state, t, a=OK)
        assert unhealthy_ids(overlay(node_tree(), state)) == {A}
    state = probe(state, 10001.0, a=LOST)
    assert {f.source for f in state.faults.values()} == {"xid", "lost"}
    state = probe(state, 10002.0, a=OK)  # lost, then answering again: it was reset
    assert state.faults == {}


def test_volatile_counter_drop_counts_as_a_reset() -> None:
    state = probe(HealthState(), 0.0, a=replace(OK, volatile_uncorrected=4))
    state = apply_event(state, xid(A, 48), XidFilter(), now=1.0)
    assert probe(state, 2.0, a=replace(OK, volatile_uncorrected=4)).faults != {}
    assert probe(state, 2.0, a=replace(OK, volatile_uncorrected=0)).faults == {}


def test_reset_clears_fatal_faults_of_that_gpu_only() -> None:
    state = probe(HealthState(), 0.0, a=OK, b=OK)
    state = apply_event(state, xid(A, 79), XidFilter(), now=1.0)
    state = apply_event(state, xid(B, 79), XidFilter(), now=1.0)
    state = probe(state, 2.0, a=LOST, b=OK)
    state = probe(state, 3.0, a=OK, b=OK)
    assert {f.scope.gpu for f in state.faults.values()} == {B}


# --- probes --------------------------------------------------------------------------------------


def test_lost_gpu_marks_only_that_gpu_and_returns() -> None:
    state = probe(HealthState(), 0.0, a=OK, b=OK, c=OK)
    state = probe(state, 1.0, a=OK, b=LOST, c=OK)
    tree = overlay(node_tree(), state)
    assert unhealthy_ids(tree) == {f"{B}::{n}" for n in range(4)}
    assert tree["nvidia.com/gpu.shared"].devices[0].reason == "GPU is lost: GPU is lost"
    unreachable = ProbeSample(reachable=False, error="Unknown Error")
    state = probe(state, 2.0, a=unreachable, b=OK, c=OK)
    assert overlay(node_tree(), state)["nvidia.com/gpu"].devices[0].reason == (
        "NVML cannot reach the GPU: Unknown Error"
    )
    assert unhealthy_ids(overlay(node_tree(), probe(state, 3.0, a=OK, b=OK, c=OK))) == set()


@pytest.mark.parametrize(
    ("before", "after", "reason"),
    [
        pytest.param(OK, replace(OK, volatile_uncorrected=2), "volatile uncorrectable ECC errors rose from 0 to 2",
                     id="counter rise"),
        pytest.param(OK, replace(OK, remap_pending=True), "a row remapping became pending", id="remap pending"),
        pytest.param(OK, replace(OK, retired_pending=True), "a page retirement became pending", id="retired pending"),
    ],
)
def test_memory_error_rise_is_transient(before: ProbeSample, after: ProbeSample, reason: str) -> None:
    state = probe(probe(HealthState(), 0.0, a=before), 1.0, a=after)
    (fault,) = state.faults.values()
    assert (fault.severity, fault.reason) == (Severity.TRANSIENT, f"{reason} (transient)")
    assert probe(state, 1.0 + QUIET - 0.1, a=after).faults != {}
    assert probe(state, 1.0 + QUIET, a=after).faults == {}  # no further rise: it clears


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(replace(OK, volatile_uncorrected=7), id="nonzero counter"),
        pytest.param(replace(OK, remap_pending=True), id="remap already pending"),
        pytest.param(ProbeSample(), id="GPU without ECC counters"),
    ],
)
def test_first_probe_is_the_baseline(first: ProbeSample) -> None:
    assert probe(HealthState(), 0.0, a=first).faults == {}


def test_remap_failure_is_a_condition() -> None:
    failed = replace(OK, remap_failed=True)
    state = probe(HealthState(), 0.0, a=failed)
    (fault,) = state.faults.values()
    assert (fault.source, fault.severity) == ("remap-failed", Severity.CONDITION)
    assert probe(state, 10 * QUIET, a=failed).faults == state.faults
    assert probe(state, 10 * QUIET, a=OK).faults == {}


# --- event-wait failures -------------------------------------------------------------------------


def test_wait_failures_mark_every_device_at_the_threshold_and_clear_on_success() -> None:
    state = HealthState()
    for failures in range(1, 3):
        assert apply_wait_result(state, failures, "Unknown Error", 3, now=0.0) is state
    marked = apply_wait_result(state, 3, "Unknown Error", 3, now=0.0)
    assert unhealthy_ids(overlay(node_tree(), marked)) == {d.id for r in node_tree().values() for d in r.devices}
    assert apply_wait_result(marked, 4, "Unknown Error", 3, now=1.0) is marked  # a storm is one change
    assert apply_wait_result(marked, 0, "", 3, now=2.0).faults == {}


# --- trees and transitions -----------------------------------------------------------------------


def test_transitions_one_per_changed_device_with_xid() -> None:
    tree = node_tree()
    state = apply_event(HealthState(), xid(B, 79), XidFilter(), now=0.0)
    marked = overlay(tree, state)
    changes = transitions(tree, marked, state)
    assert [(t.resource, t.device, t.health, t.xid) for t in changes] == [
        ("nvidia.com/gpu.shared", f"{B}::{n}", Health.UNHEALTHY, 79) for n in range(4)
    ]
    assert all(t.reason == "XID 79: GPU has fallen off the bus (fatal)" for t in changes)
    back = transitions(marked, tree, HealthState())
    assert [(t.device, t.health, t.reason, t.xid) for t in back] == [
        (f"{B}::{n}", Health.HEALTHY, "", None) for n in range(4)
    ]
    assert transitions(marked, marked, state) == []


def test_forget_gpus_drops_faults_and_samples_of_vanished_gpus() -> None:
    state = probe(HealthState(), 0.0, a=OK, b=OK)
    state = apply_event(state, xid(A, 79), XidFilter(), now=0.0)
    state = apply_event(state, xid(B, 79), XidFilter(), now=0.0)
    state = apply_wait_result(state, 1, "x", 1, now=0.0)
    kept = forget_gpus(state, [B])
    assert {f.scope.gpu for f in kept.faults.values()} == {B, None}
    assert set(kept.samples) == {B}


# --- invariants ----------------------------------------------------------------------------------

TRANSIENT_XIDS = sorted(x for x, c in XID_POLICY.items() if c.severity is Severity.TRANSIENT)
FATAL_XIDS = sorted(x for x, c in XID_POLICY.items() if c.severity is Severity.FATAL)
events_strategy = st.lists(
    st.tuples(
        st.sampled_from([A, B, C]),
        st.sampled_from(TRANSIENT_XIDS + FATAL_XIDS),
        st.floats(min_value=0, max_value=1000),
        st.sampled_from([(None, None), (1, 0), (2, 1), (2, None)]),
    ),
    max_size=30,
)


@given(events_strategy)
def test_after_a_quiet_period_only_fatal_faults_remain(
    events: list[tuple[str, int, float, tuple[int | None, int | None]]],
) -> None:
    state = probe(HealthState(), 0.0, a=OK, b=OK, c=OK)
    for gpu, number, at, (gi, ci) in sorted(events, key=lambda e: e[2]):
        state = apply_event(state, xid(gpu, number, gi, ci), ALL_XIDS, now=at)
    later = probe(state, 1000.0 + QUIET, a=OK, b=OK, c=OK)
    fatal_gpus = {gpu for gpu, number, _, _ in events if number in FATAL_XIDS}
    assert {f.scope.gpu for f in later.faults.values()} == fatal_gpus
    assert all(f.severity is Severity.FATAL for f in later.faults.values())
    tree = overlay(node_tree(), later)
    assert [d.id for r in tree.values() for d in r.devices] == [d.id for r in node_tree().values() for d in r.devices]
    # A device is unhealthy exactly when a fault covers it.
    for resource in tree.values():
        for device in resource.devices:
            covered = any(f.scope.covers(device) for f in later.faults.values())
            assert device.healthy is not covered


def test_fault_key_separates_xids_on_one_gpu() -> None:
    state = apply_event(HealthState(), xid(A, 94), ALL_XIDS, now=0.0)
    state = apply_event(state, xid(A, 79), ALL_XIDS, now=1.0)
    assert sorted(f.xid or 0 for f in state.faults.values()) == [79, 94]
    state = probe(probe(state, 0.0, a=OK), 100.0, a=OK)
    assert [f.xid for f in state.faults.values()] == [79]
    assert isinstance(next(iter(state.faults.values())), Fault)
    assert next(iter(state.faults.values())).scope == Scope(A)
