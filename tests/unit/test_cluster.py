"""What the cluster sees: the bodies (Events, the GPUHealthy condition, the taint) and the
reporter against the in-memory cluster (nvdp.testing.fake_cluster)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

from nvdp.core.backoff import Backoff
from nvdp.core.health import GpuHealth, Severity
from nvdp.ops.cluster import (
    TAINT_KEY,
    ClusterReporter,
    Taint,
    condition_for,
    condition_patch,
    event_body,
    event_for,
    taints_with,
    taints_without,
)
from nvdp.ops.counters import PluginStats
from nvdp.testing.fake_cluster import InMemoryCluster

NODE = "gpu-node-1"
A, B = "GPU-aaaa", "GPU-bbbb"


def ok(uuid: str, index: int) -> GpuHealth:
    return GpuHealth(uuid, index)


def sick(uuid: str, index: int, reason: str, xid: int | None = None, fatal: bool = False) -> GpuHealth:
    severity = Severity.FATAL if fatal else Severity.TRANSIENT
    return GpuHealth(uuid, index, False, reason, xid, severity, not fatal)


# --- bodies ------------------------------------------------------------------------------------


def test_an_event_per_change_with_reason_xid_gpu_and_recovery() -> None:
    assert event_for(NODE, None, ok(A, 0)) is None  # first seen, healthy: nothing happened
    assert event_for(NODE, ok(A, 0), ok(A, 0)) is None
    down = event_for(NODE, ok(A, 0), sick(A, 0, "XID 79: GPU has fallen off the bus (fatal)", 79, fatal=True))
    assert down is not None
    assert (down.reason, down.warning, down.gpu_uuid, down.xid, down.recovery_expected) == (
        "GPUUnhealthy", True, A, 79, False)
    assert down.message == (
        f"GPU 0 ({A}) is unhealthy: XID 79: GPU has fallen off the bus (fatal). XID 79. "
        "recovery expected: no (fatal: it needs a GPU reset, or what the driver asks for)")
    worse = event_for(NODE, sick(A, 0, "XID 94: x (transient)", 94), sick(A, 0, "XID 48: y (fatal)", 48, True))
    assert worse is not None and worse.reason == "GPUHealthChanged"
    up = event_for(NODE, sick(A, 0, "XID 94: x (transient)", 94), ok(A, 0))
    assert up is not None and (up.reason, up.warning) == ("GPUHealthy", False)
    assert up.message == f"GPU 0 ({A}) is healthy again (was: XID 94: x (transient))"
    body = event_body(down, uid="uid-1", now=datetime(2026, 5, 1, 12, 0, tzinfo=UTC))
    assert body["involvedObject"] == {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": "uid-1"}
    assert (body["type"], body["reason"], body["metadata"]["namespace"]) == ("Warning", "GPUUnhealthy", "default")
    assert body["metadata"]["annotations"] == {"nvidia.com/gpu-uuid": A, "nvidia.com/recovery-expected": "false",
                                               "nvidia.com/xid": "79"}
    assert body["firstTimestamp"] == body["lastTimestamp"] == "2026-05-01T12:00:00Z"


def test_the_condition_counts_unhealthy_gpus() -> None:
    assert condition_for([ok(A, 0), ok(B, 1)]).status == "True"
    condition = condition_for([sick(A, 0, "XID 79: off the bus (fatal)", 79, True), ok(B, 1)])
    assert (condition.type, condition.status, condition.reason, condition.unhealthy, condition.total) == (
        "GPUHealthy", "False", "GPUsUnhealthy", 1, 2)
    assert condition.message == f"1 of 2 GPUs unhealthy: GPU 0 ({A}): XID 79: off the bus (fatal)"
    since = datetime(2026, 5, 1, tzinfo=UTC)
    patch = condition_patch(condition.__class__(**{**condition.__dict__, "since": since}),
                            now=datetime(2026, 5, 2, tzinfo=UTC))
    (sent,) = patch["status"]["conditions"]
    assert (sent["lastTransitionTime"], sent["lastHeartbeatTime"]) == ("2026-05-01T00:00:00Z", "2026-05-02T00:00:00Z")


def test_taints_are_added_replaced_and_removed_without_touching_others() -> None:
    other = {"key": "dedicated", "value": "ml", "effect": "NoSchedule"}
    taints = taints_with([other], Taint(TAINT_KEY, "1"))
    assert taints == [other, {"key": TAINT_KEY, "value": "1", "effect": "NoSchedule"}]
    assert taints_with(taints, Taint(TAINT_KEY, "2"))[-1]["value"] == "2"
    assert len(taints_with(taints, Taint(TAINT_KEY, "2"))) == 2
    assert taints_without(taints, TAINT_KEY) == [other]


# --- the reporter ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def reporting(
    cluster: InMemoryCluster, taint_on_fatal: bool = False, stats: PluginStats | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC), reporter: ClusterReporter | None = None,
) -> AsyncIterator[ClusterReporter]:
    reporter = reporter or ClusterReporter(cluster, NODE, taint_on_fatal, stats, Backoff(0.01, 0.05), clock)
    task = asyncio.create_task(reporter.run())
    try:
        yield reporter
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_events_and_the_condition_reach_the_node_in_order() -> None:
    cluster = InMemoryCluster(NODE)
    async with reporting(cluster) as reporter:
        reporter.observe([ok(A, 0), ok(B, 1)])
        await cluster.wait_for(lambda: cluster.condition("GPUHealthy") is not None)
        assert cluster.events == []  # nothing happened yet
        first = cluster.condition("GPUHealthy")
        assert first is not None and first["status"] == "True"
        reporter.observe([sick(A, 0, "XID 94: contained (transient)", 94), ok(B, 1)])
        reporter.observe([sick(A, 0, "XID 94: contained (transient)", 94), sick(B, 1, "GPU is lost: x")])
        await cluster.wait_for(lambda: len(cluster.events) == 2 and not reporter.pending)
        assert [(e["reason"], e["metadata"]["annotations"]["nvidia.com/gpu-uuid"]) for e in cluster.events] == [
            ("GPUUnhealthy", A), ("GPUUnhealthy", B)]
        condition = cluster.condition("GPUHealthy")
        assert condition is not None and condition["status"] == "False"
        assert condition["message"].startswith("2 of 2 GPUs unhealthy: ")
        assert cluster.condition("Ready") is not None  # a strategic merge: the kubelet's conditions stay
        reporter.observe([ok(A, 0), ok(B, 1)])
        await cluster.wait_for(lambda: len(cluster.events) == 4 and not reporter.pending)
        assert [e["reason"] for e in cluster.events[2:]] == ["GPUHealthy", "GPUHealthy"]
        back = cluster.condition("GPUHealthy")
        assert back is not None and back["status"] == "True"


async def test_failures_are_retried_counted_and_nothing_is_lost() -> None:
    cluster = InMemoryCluster(NODE)
    stats = PluginStats()
    cluster.fail_next(3, kind="event")
    async with reporting(cluster, stats=stats) as reporter:
        reporter.observe([ok(A, 0)])
        reporter.observe([sick(A, 0, "XID 48: double-bit ECC error (fatal)", 48, True)])
        await cluster.wait_for(lambda: not reporter.pending)
    assert [e["reason"] for e in cluster.events] == ["GPUUnhealthy"]
    assert cluster.calls == ["event", "condition"]  # the condition waited for the event before it
    assert stats.snapshot().cluster_updates == {("event", "error"): 3, ("event", "ok"): 1, ("condition", "ok"): 1}


async def test_taint_on_fatal_comes_and_goes_and_a_stale_one_is_removed() -> None:
    cluster = InMemoryCluster(NODE)
    cluster.node["spec"]["taints"] = [{"key": TAINT_KEY, "value": "1", "effect": "NoSchedule"}]  # an earlier run's
    async with reporting(cluster, taint_on_fatal=True) as reporter:
        reporter.observe([ok(A, 0), ok(B, 1)])
        await cluster.wait_for(lambda: not reporter.pending)
        assert cluster.taints == []
        reporter.observe([sick(A, 0, "XID 94: contained (transient)", 94), ok(B, 1)])
        await cluster.wait_for(lambda: not reporter.pending)
        assert cluster.taints == []  # transient: no taint
        reporter.observe([sick(A, 0, "XID 79: off the bus (fatal)", 79, True), ok(B, 1)])
        await cluster.wait_for(lambda: bool(cluster.taints))
        assert cluster.taints == [{"key": TAINT_KEY, "value": "1", "effect": "NoSchedule"}]
        reporter.observe([ok(A, 0), ok(B, 1)])
        await cluster.wait_for(lambda: not cluster.taints)


async def test_the_transition_time_moves_only_with_the_status() -> None:
    cluster = InMemoryCluster(NODE)
    now = [datetime(2026, 5, 1, 12, 0, tzinfo=UTC)]
    async with reporting(cluster, clock=lambda: now[0]) as reporter:
        reporter.observe([sick(A, 0, "XID 94: a (transient)", 94)])
        await cluster.wait_for(lambda: not reporter.pending)
        now[0] += timedelta(minutes=5)
        reporter.observe([sick(A, 0, "XID 48: b (fatal)", 48, True)])  # still False, another reason
        await cluster.wait_for(lambda: not reporter.pending)
        assert (cluster.condition("GPUHealthy") or {})["lastTransitionTime"] == "2026-05-01T12:00:00Z"
        now[0] += timedelta(minutes=5)
        reporter.observe([ok(A, 0)])  # the status changes
        await cluster.wait_for(lambda: not reporter.pending)
        assert (cluster.condition("GPUHealthy") or {})["lastTransitionTime"] == "2026-05-01T12:10:00Z"


async def test_a_long_outage_keeps_the_newest_events() -> None:
    cluster = InMemoryCluster(NODE)
    cluster.fail_next(10_000, kind="event")
    reporter = ClusterReporter(cluster, NODE, backoff=Backoff(0.01, 0.05))
    for n in range(300):  # healthy, sick, healthy, ...: 299 changes, one event each
        reporter.observe([sick(A, 0, f"XID 94: event {n} (transient)", 94) if n % 2 else ok(A, 0)])
    assert reporter.dropped_events == 299 - 256
    cluster.heal()
    async with reporting(cluster, reporter=reporter):
        await cluster.wait_for(lambda: not reporter.pending)
    assert len(cluster.events) == 256
    # The oldest 43 changes are gone: the first kept is n=44 (healthy again after event 43).
    assert cluster.events[0]["message"].endswith("is healthy again (was: XID 94: event 43 (transient))")
    assert "event 299" in cluster.events[-1]["message"]
