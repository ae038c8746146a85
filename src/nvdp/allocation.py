"""GetPreferredAllocation policies. Pure functions over device IDs and a precomputed topology.

- Full GPUs: stay on one NUMA node when the request fits (best fit: the node with the fewest free
  devices that still holds the request), otherwise fill from the fullest nodes.
- Shared replicas (`<uuid>::<n>`): the official greedy `distributed` / `packed` policies.

Degenerate requests never raise; they get an empty answer (the kubelet then picks on its own):
size <= 0, must_include larger than size, or fewer usable devices than size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from nvdp.devices import Device, Resource, Topology
from nvdp.resources import physical_id


def usable(resource: Resource, ids: Sequence[str]) -> list[Device]:
    """Known, healthy, de-duplicated devices in request order (anything else is ignored)."""
    seen: set[str] = set()
    out = []
    for device_id in ids:
        device = resource.by_id.get(device_id)
        if device is not None and device.healthy and device_id not in seen:
            seen.add(device_id)
            out.append(device)
    return out


def preferred(
    resource: Resource,
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    topology: Topology,
    shared_policy: str = "distributed",
) -> list[str]:
    required = usable(resource, must_include)
    candidates = [d for d in usable(resource, available) if d.id not in {r.id for r in required}]
    if size <= 0 or len(required) > size or len(required) + len(candidates) < size:
        return []
    needed = size - len(required)
    if any(d.replica is not None for d in (*required, *candidates)):
        picks = _greedy_replicas(resource, required, candidates, needed, shared_policy)
    else:
        picks = _numa_aligned(required, candidates, needed)
    return [d.id for d in (*required, *picks)]


def _numa_aligned(required: list[Device], candidates: list[Device], needed: int) -> list[Device]:
    by_node: dict[int | None, list[Device]] = {}
    for d in candidates:
        by_node.setdefault(d.numa_node, []).append(d)
    required_nodes = {d.numa_node for d in required}
    if len(required_nodes) == 1:
        (home,) = required_nodes
        order = [home, *sorted((n for n in by_node if n != home), key=lambda n: -len(by_node[n]))]
    else:
        fitting = sorted((n for n in by_node if len(by_node[n]) >= needed), key=lambda n: len(by_node[n]))
        rest = sorted((n for n in by_node if n not in fitting), key=lambda n: -len(by_node[n]))
        order = fitting[:1] + rest + fitting[1:]
    ordered = [d for n in order for d in by_node.get(n, [])]
    return ordered[:needed]


def _greedy_replicas(
    resource: Resource, required: list[Device], candidates: list[Device], needed: int, policy: str
) -> list[Device]:
    total = Counter(physical_id(d.id) for d in resource.devices)
    free = Counter(physical_id(d.id) for d in candidates)
    picked_per_gpu: Counter[str] = Counter()
    pool = list(candidates)
    picks: list[Device] = []
    sign = -1 if policy == "packed" else 1
    for _ in range(needed):
        # distributed: least-used GPU first; packed: most-used first; then the GPU picked least now.
        def key(d: Device) -> tuple[int, int]:
            gpu = physical_id(d.id)
            return (sign * (total[gpu] - free[gpu]), picked_per_gpu[gpu])

        best = min(pool, key=key)
        pool.remove(best)
        picks.append(best)
        gpu = physical_id(best.id)
        free[gpu] -= 1
        picked_per_gpu[gpu] += 1
    return picks
