"""The immutable device model: what discovery finds and what the kubelet is shown.

Discovery produces a `Node` (physical GPUs, their MIG devices and the topology between them).
`resources.build_tree` turns a node and the configuration into a `DeviceTree`: for every resource
name, the devices advertised under it. Health changes and reloads build a new tree; nothing here
is ever mutated, and `diff` is the one place that says what changed between two trees.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

# The driver's control device nodes a container may need beside its GPUs' /dev/nvidiaN, in the
# order they are passed; discovery keeps the ones present on the node (`Node.control_devices`).
CONTROL_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")


class Health(enum.StrEnum):
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


class PcieLevel(enum.IntEnum):
    """How two GPUs meet on PCIe (NVML's common-ancestor levels), best first."""

    SAME_BOARD = 0  # NVML INTERNAL
    SINGLE_SWITCH = 10
    MULTIPLE_SWITCHES = 20
    HOST_BRIDGE = 30
    SAME_NUMA_NODE = 40  # NVML NODE
    CROSS_CPU = 50  # NVML SYSTEM


@dataclass(frozen=True)
class MigInfo:
    """One MIG device as NVML reports it (read-only facts).

    The slice counts, memory and engine counts are NVML's `nvmlDeviceAttributes_t` for the MIG
    device; `attributes` / `neg_attributes` come from its GPU-instance profile (`+me`, `+me.all`,
    `+gfx`; `-me`). The profile name (`1g.10gb+me`) is derived from these in `nvdp.mig`.
    """

    slot: int  # NVML MIG handle slot j (not a dense counter)
    uuid: str
    gi_id: int  # GPU instance id
    ci_id: int  # compute instance id within the GPU instance
    gi_slices: int
    ci_slices: int
    memory_mb: int
    attributes: tuple[str, ...] = ()  # "me", "me.all", "gfx"
    neg_attributes: tuple[str, ...] = ()  # "me" for the "-me" profiles
    multiprocessors: int = 0
    copy_engines: int = 0
    decoders: int = 0
    encoders: int = 0
    jpegs: int = 0
    ofas: int = 0


@dataclass(frozen=True)
class FabricInfo:
    """Where a fabric-attached GPU (multi-node NVLink) sits: NVML's GPU fabric info, kept only
    when the GPU's registration with the fabric manager completed successfully."""

    cluster_uuid: str  # the NVLink domain, as a UUID string
    clique_id: int  # the clique (NVLink partition) within it


@dataclass(frozen=True)
class VgpuInfo:
    """The vGPU host's driver, from the PCI vendor-specific capability of a vGPU guest device
    (empty strings when the capability carries no driver-version record)."""

    host_driver_version: str
    host_driver_branch: str


@dataclass(frozen=True)
class GpuInfo:
    """One physical GPU as discovery reports it.

    The last four facts are what GPU feature discovery labels besides the plugin's: whether the
    GPU can do MIG at all (NVML answers its MIG mode), its PCI class from sysfs (0x030200 for a
    3D controller, 0x030000 for VGA; None when unreadable), its fabric clique and, on a vGPU guest,
    the host's driver.
    """

    index: int
    uuid: str
    minor: int
    name: str
    pci_bus_id: str  # NVML form, e.g. "00000000:3B:00.0"
    memory_bytes: int
    compute_capability: str  # "9.0"
    numa_node: int | None = None
    mig_enabled: bool = False
    mig_devices: tuple[MigInfo, ...] = ()
    mig_capable: bool = False
    pci_class: int | None = None
    fabric: FabricInfo | None = None
    vgpu: VgpuInfo | None = None

    @property
    def device_path(self) -> str:
        return f"/dev/nvidia{self.minor}"


@dataclass(frozen=True)
class Topology:
    """How every pair of GPUs is connected, keyed by the pair of GPU UUIDs (order-free)."""

    nvlinks: Mapping[frozenset[str], int] = field(default_factory=dict)
    pcie: Mapping[frozenset[str], PcieLevel] = field(default_factory=dict)

    def links(self, a: str, b: str) -> int:
        return self.nvlinks.get(frozenset((a, b)), 0)

    def pcie_level(self, a: str, b: str) -> PcieLevel | None:
        return self.pcie.get(frozenset((a, b)))


@dataclass(frozen=True)
class Node:
    """Everything discovery found on this machine."""

    gpus: tuple[GpuInfo, ...]
    topology: Topology = field(default_factory=Topology)
    driver_version: str = ""
    cuda_driver_version: int = 0
    # Control device nodes present on this node (/dev/nvidiactl, /dev/nvidia-uvm, ...), in order.
    control_devices: tuple[str, ...] = ()
    # /proc/driver/nvidia-caps/mig-minors parsed: "gpu0/gi1/access", "gpu0/gi1/ci0/access",
    # "config", "monitor" -> the minor of /dev/nvidia-caps/nvidia-cap<minor>. Empty when absent.
    mig_minors: Mapping[str, int] = field(default_factory=dict)

    def gpu(self, uuid: str) -> GpuInfo | None:
        return next((g for g in self.gpus if g.uuid == uuid), None)


@dataclass(frozen=True)
class Device:
    """One device as advertised to the kubelet under one resource."""

    id: str  # GPU UUID, MIG UUID, or "<uuid>::<n>" for a shared replica
    gpu_uuid: str  # the physical GPU it lives on
    index: str  # "<i>" for a GPU, "<i>:<j>" for a MIG device (the `index` id strategy)
    paths: tuple[str, ...]  # device nodes the container needs, as seen on the host's /dev
    numa_node: int | None = None
    health: Health = Health.HEALTHY
    reason: str = ""  # why it is unhealthy (empty when healthy)
    replica: int | None = None
    mig: MigInfo | None = None

    @property
    def healthy(self) -> bool:
        return self.health is Health.HEALTHY

    def with_health(self, health: Health, reason: str = "") -> Device:
        return replace(self, health=health, reason=reason if health is Health.UNHEALTHY else "")


@dataclass(frozen=True)
class Resource:
    """The devices advertised under one resource name, in a stable order."""

    name: str  # e.g. "nvidia.com/gpu"
    devices: tuple[Device, ...]

    @cached_property
    def by_id(self) -> Mapping[str, Device]:
        return {d.id: d for d in self.devices}

    @property
    def short_name(self) -> str:
        return self.name.split("/", 1)[-1]


DeviceTree = Mapping[str, Resource]


@dataclass(frozen=True)
class TreeDiff:
    added: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.updated or self.removed)


def diff(old: DeviceTree, new: DeviceTree) -> TreeDiff:
    """Which resources appear, change or vanish between two trees."""
    return TreeDiff(
        added=tuple(n for n in new if n not in old),
        updated=tuple(n for n in new if n in old and old[n] != new[n]),
        removed=tuple(n for n in old if n not in new),
    )
