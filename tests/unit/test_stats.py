"""PluginStats: the counters behind the metrics, fed with plain data."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvdp.core.devices import Device, DeviceTree, Health, Resource
from nvdp.errors import AllocationError, UnhealthyDevice, UnknownDevice
from nvdp.ops.counters import LATENCY_BUCKETS, Histogram, PluginStats, error_kind

GPU = "nvidia.com/gpu"
BAD = Health.UNHEALTHY


def device(n: int, health: Health = Health.HEALTHY, reason: str = "") -> Device:
    return Device(id=f"GPU-{n}", gpu_uuid=f"GPU-{n}", index=str(n), paths=(f"/dev/nvidia{n}",)).with_health(
        health, reason
    )


def tree(*devices: Device, name: str = GPU) -> dict[str, Resource]:  # a dict, so cases can merge trees with |
    return {name: Resource(name, devices)}


@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), max_size=50))
def test_histogram_buckets_are_cumulative_and_use_le(values: list[float]) -> None:
    h = Histogram()
    for v in values:
        h.observe(v)
    rows = h.cumulative()
    assert [b for b, _ in rows] == [*LATENCY_BUCKETS, float("inf")]
    for bound, count in rows:
        assert count == sum(v <= bound for v in values)
    assert h.count == len(values)
    assert h.total == pytest.approx(sum(values))


def test_a_value_on_a_bound_counts_in_that_bucket() -> None:
    h = Histogram(bounds=(0.5, 1.0))
    h.observe(0.5)
    h.observe(1.0)
    h.observe(1.5)
    assert h.cumulative() == [(0.5, 1), (1.0, 2), (float("inf"), 3)]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(tree(device(0)), tree(device(0)), {}, id="no change"),
        pytest.param(tree(device(0)), tree(device(0, BAD, "XID 79")),
                     {(GPU, "Unhealthy", "XID 79"): 1}, id="goes unhealthy"),
        pytest.param(tree(device(0, BAD, "XID 48")), tree(device(0)),
                     {(GPU, "Healthy", "XID 48"): 1}, id="recovers, counted under the reason that cleared"),
        pytest.param(tree(device(0, BAD, "XID 48")), tree(device(0, BAD, "XID 79")),
                     {(GPU, "Unhealthy", "XID 79"): 1}, id="still unhealthy, new reason: counted"),
        pytest.param({}, tree(device(0), device(1)), {}, id="new healthy devices"),
        pytest.param({}, tree(device(0, BAD, "GPU lost")), {(GPU, "Unhealthy", "GPU lost"): 1},
                     id="new device arriving unhealthy"),
        pytest.param(tree(device(0, BAD, "x")), {}, {}, id="resource removed"),
        pytest.param(tree(device(0), device(1), device(2)),
                     tree(device(0, BAD, "XID 79"), device(1, BAD, "XID 79"), device(2)),
                     {(GPU, "Unhealthy", "XID 79"): 2}, id="two devices, one reason"),
        pytest.param(tree(device(0)) | tree(device(0), name="nvidia.com/gpu.shared"),
                     tree(device(0, BAD, "r")) | tree(device(0), name="nvidia.com/gpu.shared"),
                     {(GPU, "Unhealthy", "r"): 1}, id="per resource"),
    ],
)
def test_observe_tree_counts_health_transitions(
    old: DeviceTree, new: DeviceTree, expected: dict[tuple[str, str, str], int]
) -> None:
    stats = PluginStats()
    stats.observe_tree(old, new)
    assert stats.snapshot().health_transitions == expected


def test_allocations_errors_xids_and_streams() -> None:
    stats = PluginStats()
    stats.record_allocation(GPU, ["a", "b"], None)
    stats.record_allocation(GPU, ["c"], None)
    stats.record_allocation(GPU, ["x"], UnknownDevice(GPU, "x"))
    stats.record_health_event("GPU-0", "xid", 79)
    stats.record_health_event("GPU-0", "xid", 79)
    stats.record_health_event("GPU-1", "xid", 48)
    stats.record_health_event("GPU-1", "ecc")
    stats.stream_opened(GPU)
    stats.stream_opened(GPU)
    stats.stream_closed(GPU)
    stats.record_rpc(GPU, "Allocate", 0.0003, "OK")
    stats.record_rpc(GPU, "Allocate", 0.002, "INVALID_ARGUMENT")
    snap = stats.snapshot()
    assert snap.allocations == {GPU: 2}
    assert snap.allocated_devices == {GPU: 3}
    assert snap.allocation_errors == {(GPU, "unknown_device"): 1}
    assert snap.xid_events == {("GPU-0", 79): 2, ("GPU-1", 48): 1}
    assert snap.health_events == {("GPU-0", "xid"): 2, ("GPU-1", "xid"): 1, ("GPU-1", "ecc"): 1}
    assert snap.streams == {GPU: 1} and stats.open_streams(GPU) == 1
    assert snap.rpc_codes == {(GPU, "Allocate", "OK"): 1, (GPU, "Allocate", "INVALID_ARGUMENT"): 1}
    assert snap.rpc_latency[GPU, "Allocate"].count == 2


def test_snapshot_is_a_copy() -> None:
    stats = PluginStats()
    stats.record_rpc(GPU, "Allocate", 0.001, "OK")
    snap = stats.snapshot()
    stats.record_rpc(GPU, "Allocate", 0.001, "OK")
    stats.record_health_event("GPU-0", "xid", 13)
    assert snap.rpc_latency[GPU, "Allocate"].count == 1
    assert snap.xid_events == {}


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        pytest.param(UnknownDevice(GPU, "x"), "unknown_device", id="unknown"),
        pytest.param(UnhealthyDevice(GPU, "x"), "unhealthy_device", id="unhealthy"),
        pytest.param(AllocationError("too many"), "allocation_error", id="generic"),
    ],
)
def test_error_kind(error: Exception, kind: str) -> None:
    assert error_kind(error) == kind
