"""The replica picker compares GPUs, not replicas; it must pick exactly what the one-replica-at-a-time
greedy (the official policy, kept here as the reference) picks, in the same order."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from nvdp.core.allocation import preferred
from nvdp.core.devices import Device, Resource, Topology
from nvdp.core.resources import physical_id


def reference(resource: Resource, candidates: list[Device], needed: int, policy: str) -> list[str]:
    total = Counter(physical_id(d.id) for d in resource.devices)
    free = Counter(physical_id(d.id) for d in candidates)
    picked: Counter[str] = Counter()
    pool, picks = list(candidates), []
    sign = -1 if policy == "packed" else 1
    for _ in range(needed):
        best = min(pool, key=lambda d: (sign * (total[physical_id(d.id)] - free[physical_id(d.id)]),
                                        picked[physical_id(d.id)]))
        pool.remove(best)
        picks.append(best.id)
        free[physical_id(best.id)] -= 1
        picked[physical_id(best.id)] += 1
    return picks


@st.composite
def requests(draw: st.DrawFn) -> tuple[Resource, list[str], int, str]:
    gpus, per_gpu = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    devices = tuple(
        Device(id=f"GPU-{g}::{n}", gpu_uuid=f"GPU-{g}", index=str(g), paths=(), replica=n)
        for g in range(gpus) for n in range(per_gpu)
    )
    resource = Resource("nvidia.com/gpu", devices)
    available = draw(st.permutations([d.id for d in devices]).flatmap(
        lambda ids: st.integers(0, len(ids)).map(lambda k: list(ids[:k]))))
    size = draw(st.integers(1, max(1, len(available))))
    return resource, available, size, draw(st.sampled_from(["distributed", "packed"]))


@settings(max_examples=300, deadline=None)
@given(requests())
def test_same_picks_as_the_one_at_a_time_greedy(case: tuple[Resource, list[str], int, str]) -> None:
    resource, available, size, policy = case
    got = preferred(resource, available, [], size, Topology(), policy)
    if len(available) < size:
        assert got == []
        return
    candidates = [resource.by_id[i] for i in available]
    assert got == reference(resource, candidates, size, policy)

