"""GetPreferredAllocation for shared replicas: the official greedy policies and their test table."""

from __future__ import annotations

import pytest

from nvdp.core.allocation import preferred
from nvdp.core.devices import Device, Resource, Topology
from nvdp.core.resources import physical_id


def replicas(gpus: int, per_gpu: int) -> Resource:
    devices = tuple(
        Device(id=f"GPU-{g}::{n}", gpu_uuid=f"GPU-{g}", index=str(g), paths=(f"/dev/nvidia{g}",), replica=n)
        for g in range(gpus)
        for n in range(per_gpu)
    )
    return Resource("nvidia.com/gpu", devices)


def per_gpu(ids: list[str]) -> list[int]:
    counts: dict[str, int] = {}
    for i in ids:
        counts[physical_id(i)] = counts.get(physical_id(i), 0) + 1
    return sorted(counts.values(), reverse=True)


@pytest.mark.parametrize(
    ("policy", "gpus", "per", "size", "expected"),
    [
        pytest.param("distributed", 2, 4, 2, [1, 1], id="distributed 2x4 size 2"),
        pytest.param("distributed", 2, 4, 4, [2, 2], id="distributed 2x4 size 4"),
        pytest.param("distributed", 3, 2, 3, [1, 1, 1], id="distributed 3x2 size 3"),
        pytest.param("packed", 2, 4, 2, [2], id="packed 2x4 size 2"),
        pytest.param("packed", 2, 4, 4, [4], id="packed 2x4 size 4"),
        pytest.param("packed", 2, 4, 5, [4, 1], id="packed 2x4 size 5"),
        pytest.param("packed", 3, 2, 3, [2, 1], id="packed 3x2 size 3"),
    ],
)
def test_greedy_policies(policy: str, gpus: int, per: int, size: int, expected: list[int]) -> None:
    resource = replicas(gpus, per)
    ids = preferred(resource, [d.id for d in resource.devices], [], size, Topology(), policy)
    assert len(ids) == size and len(set(ids)) == size
    assert per_gpu(ids) == expected


def test_distributed_counts_partly_used_gpus() -> None:
    resource = replicas(2, 4)
    # GPU-0 has two replicas free, GPU-1 one: one from each.
    available = ["GPU-0::0", "GPU-0::1", "GPU-1::0"]
    ids = preferred(resource, available, [], 2, Topology(), "distributed")
    assert sorted(physical_id(i) for i in ids) == ["GPU-0", "GPU-1"]


@pytest.mark.parametrize(
    ("available", "must", "size"),
    [
        pytest.param(["GPU-0::0"], [], 0, id="size 0"),
        pytest.param(["GPU-0::0"], [], 2, id="not enough"),
        pytest.param(["GPU-0::0", "GPU-0::1"], ["GPU-0::0", "GPU-0::1"], 1, id="must larger than size"),
    ],
)
def test_degenerate_requests_answer_empty(available: list[str], must: list[str], size: int) -> None:
    assert preferred(replicas(1, 2), available, must, size, Topology()) == []


def test_unknown_and_duplicate_ids_are_ignored() -> None:
    resource = replicas(1, 2)
    ids = preferred(resource, ["GPU-0::0", "bogus", "GPU-0::0", "GPU-0::1"], ["GPU-0::1"], 2, Topology())
    assert ids == ["GPU-0::1", "GPU-0::0"]
