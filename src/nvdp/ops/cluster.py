"""What the cluster sees (--cluster-health, off by default): a Kubernetes Event on the node for
every GPU health change, the node condition `GPUHealthy` with the unhealthy count, and, with
--taint-on-fatal, a NoSchedule taint while a GPU has a fatal fault.

The reporter talks to the API through `ClusterApi`, a small protocol of the three calls it
needs (post an event, patch the node's status conditions, add or remove a taint), so that it
runs against an in-memory fake in tests (`nvdp.testing.fake_cluster`) and against the real
Kubernetes client in the plugin. Bodies follow core/v1: `event_body`, `condition_patch` and
`taints_with` / `taints_without` build what an implementation sends.

Flow: the plugin calls `observe` after every health publish, on the loop, and it never blocks:
it queues the events and records the wanted condition and taint. `run` (a task of the plugin)
sends them in order; an API failure is logged once, counted, and retried with back-off, so a
slow or absent API server delays what the cluster sees and never the kubelet's device list.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from nvdp.core.backoff import Backoff
from nvdp.core.health import GpuHealth
from nvdp.ops.counters import PluginStats
from nvdp.ops.logs import LogOnce

log = logging.getLogger("nvdp.cluster")

CONDITION_TYPE = "GPUHealthy"
TAINT_KEY = "nvidia.com/gpu-fatal-error"
TAINT_EFFECT = "NoSchedule"
COMPONENT = "nvidia-device-plugin"
EVENT_UNHEALTHY, EVENT_HEALTHY, EVENT_CHANGED = "GPUUnhealthy", "GPUHealthy", "GPUHealthChanged"
RETRY = Backoff(1.0, 60.0)  # after a failed API call
# The API permissions this needs: kube/rbac.py CLUSTER_HEALTH_RULES (the chart grants exactly those).
MAX_QUEUED_EVENTS = 256  # while the API is away; the oldest are dropped first (and logged)


@dataclass(frozen=True)
class NodeEvent:
    """One Event about the node: a GPU's health changed."""

    node: str
    reason: str  # GPUUnhealthy, GPUHealthy, GPUHealthChanged (a new reason while still unhealthy)
    message: str
    warning: bool
    gpu_uuid: str
    gpu_index: int
    xid: int | None = None
    recovery_expected: bool = True


@dataclass(frozen=True)
class NodeCondition:
    type: str
    status: str  # "True": every GPU healthy; "False": some are not
    reason: str
    message: str
    unhealthy: int
    total: int
    since: datetime | None = None  # lastTransitionTime: when `status` last changed


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str = TAINT_EFFECT


class ClusterApi(Protocol):
    """The calls the reporter makes. Implementations raise any Exception on failure (the
    reporter retries); each call either takes effect whole or not at all."""

    async def post_event(self, event: NodeEvent) -> None: ...

    async def patch_node_condition(self, node: str, condition: NodeCondition) -> None:
        """PATCH nodes/<node>/status with `condition_patch(condition)` (a strategic merge: the
        node's other conditions stay)."""
        ...

    async def add_taint(self, node: str, taint: Taint) -> None:
        """Add the taint, or replace one with the same key and effect (`taints_with`)."""
        ...

    async def remove_taint(self, node: str, key: str) -> None:
        """Remove taints with this key (`taints_without`); none there is not an error."""
        ...

    async def close(self) -> None:
        """Free the connection (the plugin calls it once, on the way out)."""
        ...


# --- what is sent ------------------------------------------------------------------------------


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(gpu: GpuHealth) -> str:
    return f"GPU {gpu.index} ({gpu.uuid})"


def recovery_text(gpu: GpuHealth) -> str:
    if gpu.recovery_expected:
        return "recovery expected: yes (nvdp returns it to Healthy when the fault is over)"
    return "recovery expected: no (fatal: it needs a GPU reset, or what the driver asks for)"


def event_for(node: str, before: GpuHealth | None, now: GpuHealth) -> NodeEvent | None:
    """The event for one GPU's change, None when nothing the cluster shows changed."""
    if before is not None and (before.healthy, before.reason) == (now.healthy, now.reason):
        return None
    if before is None and now.healthy:
        return None  # a GPU seen for the first time, healthy: nothing happened to it
    if now.healthy:
        message = f"{describe(now)} is healthy again" + (f" (was: {before.reason})" if before and before.reason else "")
        return NodeEvent(node, EVENT_HEALTHY, message, False, now.uuid, now.index)
    reason = EVENT_UNHEALTHY if before is None or before.healthy else EVENT_CHANGED
    xid = f" XID {now.xid}." if now.xid is not None else ""
    message = f"{describe(now)} is unhealthy: {now.reason}.{xid} {recovery_text(now)}"
    return NodeEvent(node, reason, message, True, now.uuid, now.index, now.xid, now.recovery_expected)


def condition_for(gpus: Sequence[GpuHealth]) -> NodeCondition:
    sick = [g for g in gpus if not g.healthy]
    if not sick:
        return NodeCondition(CONDITION_TYPE, "True", "AllGPUsHealthy", f"all {len(gpus)} GPUs healthy", 0, len(gpus))
    shown = "; ".join(f"{describe(g)}: {g.reason}" for g in sick[:8]) + ("; ..." if len(sick) > 8 else "")
    return NodeCondition(CONDITION_TYPE, "False", "GPUsUnhealthy",
                         f"{len(sick)} of {len(gpus)} GPUs unhealthy: {shown}", len(sick), len(gpus))


def fatal_count(gpus: Iterable[GpuHealth]) -> int:
    return sum(1 for g in gpus if not g.healthy and not g.recovery_expected)


def event_body(event: NodeEvent, uid: str = "", now: datetime | None = None) -> dict[str, Any]:
    """The core/v1 Event (a Node is cluster-scoped: its events live in "default", as the kubelet's)."""
    stamp = rfc3339(now or datetime.now(UTC))
    annotations = {"nvidia.com/gpu-uuid": event.gpu_uuid,
                   "nvidia.com/recovery-expected": "true" if event.recovery_expected else "false"}
    if event.xid is not None:
        annotations["nvidia.com/xid"] = str(event.xid)
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{event.node}.", "namespace": "default", "annotations": annotations},
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": event.node, "uid": uid or event.node},
        "reason": event.reason, "message": event.message, "type": "Warning" if event.warning else "Normal",
        "source": {"component": COMPONENT, "host": event.node},
        "reportingComponent": COMPONENT, "reportingInstance": event.node,
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }


def condition_patch(condition: NodeCondition, now: datetime | None = None) -> dict[str, Any]:
    """The strategic-merge patch of nodes/<name>/status that sets this one condition (merge key: type)."""
    stamp = now or datetime.now(UTC)
    return {"status": {"conditions": [{
        "type": condition.type, "status": condition.status, "reason": condition.reason,
        "message": condition.message, "lastHeartbeatTime": rfc3339(stamp),
        "lastTransitionTime": rfc3339(condition.since or stamp),
    }]}}


def taints_with(taints: Sequence[Mapping[str, Any]], taint: Taint) -> list[dict[str, Any]]:
    """spec.taints with `taint` added (one with the same key and effect is replaced). spec.taints
    has no merge key, so an implementation reads the node and writes the whole list back."""
    kept = [dict(t) for t in taints if (t.get("key"), t.get("effect")) != (taint.key, taint.effect)]
    return [*kept, {"key": taint.key, "value": taint.value, "effect": taint.effect}]


def taints_without(taints: Sequence[Mapping[str, Any]], key: str) -> list[dict[str, Any]]:
    return [dict(t) for t in taints if t.get("key") != key]


# --- the reporter ------------------------------------------------------------------------------


class ClusterReporter:
    """See the module docstring. `observe` on the loop after each publish; `run` as a task."""

    def __init__(
        self, api: ClusterApi, node: str, taint_on_fatal: bool = False, stats: PluginStats | None = None,
        backoff: Backoff = RETRY, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._api = api
        self._clock = clock
        self._node = node
        self._taint_on_fatal = taint_on_fatal
        self._stats = stats
        self._backoff = backoff
        self._last: dict[str, GpuHealth] = {}
        self._events: collections.deque[NodeEvent] = collections.deque()
        self._condition: NodeCondition | None = None  # wanted
        self._sent_condition: NodeCondition | None = None
        self._taint: Taint | None = None  # wanted (None: no taint)
        self._sent_taint: Taint | None = None
        self._taint_synced = False  # the first state is always sent: a taint left by an earlier run goes
        self._wake = asyncio.Event()
        self._failures = 0
        self._failure_log = LogOnce()
        self.dropped_events = 0

    def observe(self, gpus: Sequence[GpuHealth]) -> None:
        """The GPUs' health after a publish: queue an event per change, note the wanted condition
        and taint. Never blocks and never fails."""
        for gpu in gpus:
            event = event_for(self._node, self._last.get(gpu.uuid), gpu)
            if event is not None:
                if len(self._events) >= MAX_QUEUED_EVENTS:
                    self._events.popleft()
                    self.dropped_events += 1
                    if self._failure_log.first("dropping", "queue"):  # once per outage
                        log.warning("the Kubernetes API is behind; dropping the oldest GPU health events",
                                    extra={"queued": MAX_QUEUED_EVENTS})
                self._events.append(event)
        self._last = {g.uuid: g for g in gpus}
        condition = condition_for(gpus)
        previous = self._condition
        since = previous.since if previous is not None and previous.status == condition.status else self._clock()
        self._condition = replace(condition, since=since)
        if self._taint_on_fatal:
            fatal = fatal_count(gpus)
            self._taint = Taint(TAINT_KEY, str(fatal)) if fatal else None
        self._wake.set()

    @property
    def pending(self) -> bool:
        """Something observed is not yet sent (tests and shutdown)."""
        return bool(self._events) or self._condition != self._sent_condition or (
            self._taint_on_fatal and (not self._taint_synced or self._taint != self._sent_taint))

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                if await self._send_all():
                    self._failures = 0
                    continue
                self._failures += 1
                try:  # wait out the back-off, or until something new is observed
                    async with asyncio.timeout(self._backoff.delay(self._failures)):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()

    async def close(self) -> None:
        """Close the API (after `run` is cancelled)."""
        await self._api.close()

    async def _send_all(self) -> bool:
        """Send what is pending, in order (events first); False at the first failure."""
        while self._events:
            if not await self._call("event", self._api.post_event(self._events[0])):
                return False
            self._events.popleft()
        self._failure_log.forget("queue")
        condition = self._condition
        if condition is not None and condition != self._sent_condition:
            patch = self._api.patch_node_condition(self._node, condition)
            if not await self._call("condition", patch):
                return False
            self._sent_condition = condition
        if self._taint_on_fatal and (not self._taint_synced or self._taint != self._sent_taint):
            taint = self._taint
            call = self._api.add_taint(self._node, taint) if taint else self._api.remove_taint(self._node, TAINT_KEY)
            if not await self._call("taint", call):
                return False
            self._sent_taint, self._taint_synced = taint, True
        return True

    async def _call(self, kind: str, call: Any) -> bool:
        try:
            await call
        except Exception as exc:  # any API failure: logged once, counted, retried
            if self._stats is not None:
                self._stats.record_cluster_update(kind, ok=False)
            if self._failure_log.first(f"{type(exc).__name__}: {exc}", kind):
                log.error("cannot tell the cluster about GPU health; retrying with back-off",
                          extra={"call": kind, "node": self._node, "error": str(exc)})
            return False
        if self._stats is not None:
            self._stats.record_cluster_update(kind, ok=True)
        if self._failure_log.last(kind) is not None:
            log.info("the cluster is told about GPU health again", extra={"call": kind, "node": self._node})
            self._failure_log.forget(kind)
        return True
