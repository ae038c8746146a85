"""From NVML's per-link facts to the pair model (`devices.Topology`). Pure: nvml.py collects the
facts once at discovery, this module decides what they mean, and tests feed it plain data.

Rules (docs/allocation.md):
- An active NVLink whose far end is another GPU of the node counts for that pair. Each GPU
  reports its own ends, so a pair has min(links seen from a, links seen from b): a link only
  one side reports up is not counted (the official allocator panics on such a pair).
- An active NVLink whose far end is an NVSwitch joins its GPU to every other switch-attached GPU;
  a pair of such GPUs gets min(switch links of a, switch links of b). The official allocator
  compares the far end's PCI address with the peer GPU's, so it never credits NVSwitch pairs.
- Far ends NVML says are something else (an IBM NPU, i.e. a CPU) or cannot name while the
  address is no GPU of the node are not counted.
- The PCIe relation of a pair is NVML's common-ancestor level, kept as reported.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nvdp.core.devices import GpuInfo, PcieLevel, Topology


class Far(enum.Enum):
    """What NVML says is at the far end of an NVLink (nvmlDeviceGetNvLinkRemoteDeviceType)."""

    GPU = "gpu"
    SWITCH = "switch"
    OTHER = "other"  # an IBM NPU (POWER CPU)
    UNKNOWN = "unknown"  # NVML could not say (older drivers)


@dataclass(frozen=True)
class NvLinkEnd:
    """One active NVLink of a GPU: the PCI bus id NVML reports for its far end, and its kind."""

    remote_bus_id: str
    far: Far = Far.UNKNOWN


def bus_key(bus_id: str) -> str:
    """A comparable PCI address: NVML's "00000000:3B:00.0" -> sysfs's "0000:3b:00.0"."""
    bus = bus_id[4:] if len(bus_id) == 16 and bus_id.startswith("0000") else bus_id
    return bus.lower()


def build_topology(
    gpus: Sequence[GpuInfo],
    links: Mapping[str, Sequence[NvLinkEnd]],
    pcie: Mapping[frozenset[str], PcieLevel],
) -> Topology:
    """The pair model from each GPU's active NVLinks (by UUID) and the pairs' PCIe levels."""
    by_bus = {bus_key(g.pci_bus_id): g.uuid for g in gpus}
    seen: dict[tuple[str, str], int] = {}  # (from, to) -> links `from` reports towards `to`
    switch_links: dict[str, int] = {}
    for gpu in gpus:
        for end in links.get(gpu.uuid, ()):
            peer = by_bus.get(bus_key(end.remote_bus_id))
            if peer is not None and end.far in (Far.GPU, Far.UNKNOWN):
                if peer != gpu.uuid:
                    seen[gpu.uuid, peer] = seen.get((gpu.uuid, peer), 0) + 1
            elif end.far is Far.SWITCH:
                switch_links[gpu.uuid] = switch_links.get(gpu.uuid, 0) + 1
    nvlinks: dict[frozenset[str], int] = {}
    for i, a in enumerate(gpus):
        for b in gpus[i + 1 :]:
            direct = min(seen.get((a.uuid, b.uuid), 0), seen.get((b.uuid, a.uuid), 0))
            switched = min(switch_links.get(a.uuid, 0), switch_links.get(b.uuid, 0))
            if direct + switched:
                nvlinks[frozenset((a.uuid, b.uuid))] = direct + switched
    return Topology(nvlinks=nvlinks, pcie=dict(pcie))
