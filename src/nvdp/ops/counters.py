"""What the plugin counts for operators: plain Python, no Prometheus import.

`PluginStats` is owned by the `Plugin`. Its writers are the Allocate hook and the gRPC
interceptor (instrument.py), the manager's tree hook (every applied tree is compared with the
previous one, so a health change is counted however it was made) and the health monitor (every
event it receives for a served GPU). The metrics collector reads a `snapshot()` at scrape time,
together with the current device tree, so nothing it shows is stale.

Every writer and `snapshot()` run on the event loop (health events reach the monitor through
an asyncio queue, not from NVML's waiting thread). The lock costs little (each call is a few
dictionary updates) and keeps a writer added on another thread safe.
"""

from __future__ import annotations

import re
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nvdp.core.devices import DeviceTree, Health

# Seconds. Allocate and GetPreferredAllocation usually answer in well under a millisecond; the
# upper buckets catch a loop blocked by something else.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Histogram:
    """Counts of observations per bucket (not cumulative; the last is +Inf) and their sum."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: Prometheus' "le"
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) for every bucket, +Inf last."""
        running, rows = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            rows.append((bound, running))
        return rows

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total)


@dataclass(frozen=True)
class StatsSnapshot:
    """A consistent copy of every counter, for one scrape."""

    allocations: Mapping[str, int]  # resource -> container requests answered
    allocated_devices: Mapping[str, int]  # resource -> device IDs handed out
    allocation_errors: Mapping[tuple[str, str], int]  # (resource, error) -> refused requests
    rpc_latency: Mapping[tuple[str, str], Histogram]  # (resource, method) -> seconds
    rpc_codes: Mapping[tuple[str, str, str], int]  # (resource, method, status code) -> calls
    streams: Mapping[str, int]  # resource -> open ListAndWatch streams
    health_transitions: Mapping[tuple[str, str, str], int]  # (resource, new health, reason) -> count
    health_events: Mapping[tuple[str, str], int]  # (GPU UUID, event kind) -> events
    xid_events: Mapping[tuple[str, int], int]  # (GPU UUID, XID) -> events
    xid_recovery_actions: Mapping[tuple[str, int, str], int] = field(default_factory=dict)  # (GPU, XID, action)
    nvml_timeouts: Mapping[str, int] = field(default_factory=dict)  # kind of call -> calls past their deadline
    hygiene_refusals: Mapping[tuple[str, str, str], int] = field(default_factory=dict)  # (resource, GPU, why)
    cluster_updates: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (kind, outcome) -> API calls


def error_kind(error: BaseException) -> str:
    """A stable label for an error: its class name in snake case (UnknownDevice -> unknown_device)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()


class PluginStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._allocations: Counter[str] = Counter()
        self._allocated_devices: Counter[str] = Counter()
        self._allocation_errors: Counter[tuple[str, str]] = Counter()
        self._rpc_latency: dict[tuple[str, str], Histogram] = {}
        self._rpc_codes: Counter[tuple[str, str, str]] = Counter()
        self._streams: Counter[str] = Counter()
        self._health_transitions: Counter[tuple[str, str, str]] = Counter()
        self._health_events: Counter[tuple[str, str]] = Counter()
        self._xid_events: Counter[tuple[str, int]] = Counter()
        self._xid_recovery_actions: Counter[tuple[str, int, str]] = Counter()
        self._nvml_timeouts: Counter[str] = Counter()
        self._hygiene_refusals: Counter[tuple[str, str, str]] = Counter()
        self._cluster_updates: Counter[tuple[str, str]] = Counter()

    # --- writers ----------------------------------------------------------------------------------

    def record_allocation(self, resource: str, ids: Sequence[str], error: BaseException | None) -> None:
        """One container request of an Allocate call (the ResourceServer.on_allocate signature)."""
        with self._lock:
            if error is None:
                self._allocations[resource] += 1
                self._allocated_devices[resource] += len(ids)
            else:
                self._allocation_errors[resource, error_kind(error)] += 1

    def record_rpc(self, resource: str, method: str, seconds: float, code: str) -> None:
        with self._lock:
            self._rpc_latency.setdefault((resource, method), Histogram()).observe(seconds)
            self._rpc_codes[resource, method, code] += 1

    def stream_opened(self, resource: str) -> None:
        with self._lock:
            self._streams[resource] += 1

    def stream_closed(self, resource: str) -> None:
        with self._lock:
            self._streams[resource] -= 1

    def open_streams(self, resource: str) -> int:
        with self._lock:
            return self._streams[resource]

    def record_health_transition(self, resource: str, health: Health, reason: str) -> None:
        with self._lock:
            self._health_transitions[resource, health.value, reason] += 1

    def record_health_event(self, gpu_uuid: str, kind: str, xid: int | None = None,
                            recovery_action: str | None = None) -> None:
        """One event the driver reported for a GPU ("xid", "ecc", ...), counted whether or not the
        health policy acts on it; XID events are also counted by XID number, and by the recovery
        action the driver asked for with it, where it said ("gpu-reset", "none", ...)."""
        with self._lock:
            self._health_events[gpu_uuid, kind] += 1
            if xid is not None:
                self._xid_events[gpu_uuid, xid] += 1
                if recovery_action is not None:
                    self._xid_recovery_actions[gpu_uuid, xid, recovery_action] += 1

    def record_nvml_timeout(self, call: str) -> None:
        """An NVML call on the health path passed its deadline ("probe", "subscribe", "event-wait", "usage")."""
        with self._lock:
            self._nvml_timeouts[call] += 1

    def record_hygiene_refusal(self, resource: str, gpu_uuid: str, why: str) -> None:
        """PreStartContainer refused a GPU: "dirty" (processes or memory left), "nvml-timeout"."""
        with self._lock:
            self._hygiene_refusals[resource, gpu_uuid, why] += 1

    def record_cluster_update(self, kind: str, ok: bool) -> None:
        """One call to the Kubernetes API for --cluster-health ("event", "condition", "taint")."""
        with self._lock:
            self._cluster_updates[kind, "ok" if ok else "error"] += 1

    def observe_tree(self, old: DeviceTree, new: DeviceTree) -> None:
        """Count every device whose health or reason differs between two applied trees (as the
        health log lines do). The reason is the new one for a device going (or staying) Unhealthy
        and the one that cleared for a device recovering. A device seen for the first time counts
        only when it arrives Unhealthy."""
        for name, resource in new.items():
            before = old[name].by_id if name in old else {}
            for device in resource.devices:
                previous = before.get(device.id)
                if previous is None:
                    if not device.healthy:
                        self.record_health_transition(name, device.health, device.reason)
                elif (previous.health, previous.reason) != (device.health, device.reason):
                    reason = device.reason if not device.healthy else previous.reason
                    self.record_health_transition(name, device.health, reason)

    # --- reader -----------------------------------------------------------------------------------

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(
                allocations=dict(self._allocations),
                allocated_devices=dict(self._allocated_devices),
                allocation_errors=dict(self._allocation_errors),
                rpc_latency={k: h.copy() for k, h in self._rpc_latency.items()},
                rpc_codes=dict(self._rpc_codes),
                streams=dict(self._streams),
                health_transitions=dict(self._health_transitions),
                health_events=dict(self._health_events),
                xid_events=dict(self._xid_events),
                xid_recovery_actions=dict(self._xid_recovery_actions),
                nvml_timeouts=dict(self._nvml_timeouts),
                hygiene_refusals=dict(self._hygiene_refusals),
                cluster_updates=dict(self._cluster_updates),
            )
