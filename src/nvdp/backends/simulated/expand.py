"""Expanding a profile into the `Node` the NVML backend would report: GPUs with stable UUIDs,
MIG devices resolved against the model's profile table, mig-minors, NVLink and PCIe topology."""

from __future__ import annotations

import hashlib
import re
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from nvdp.backends.simulated.checks import first_clash
from nvdp.backends.simulated.profile import GpuSpec, MigDeviceSpec, MigSpec, Profile
from nvdp.core import mig as migrules
from nvdp.core import pci
from nvdp.core.devices import FabricInfo, GpuInfo, MigInfo, Node, PcieLevel, Topology, VgpuInfo
from nvdp.core.migprofiles import MODELS
from nvdp.errors import ConfigError


def _stable_uuid(prefix: str, *parts: Any) -> str:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return f"{prefix}-{uuidlib.UUID(bytes=digest[:16])}"


def _merge(defaults: GpuSpec, spec: GpuSpec) -> dict[str, Any]:
    merged = defaults.model_dump(exclude_unset=True)
    merged.update(spec.model_dump(exclude_unset=True))
    return merged


def build_node(label: str, profile: Profile) -> Node:
    """Expand a profile into the same `Node` the NVML backend would report. Every GPU and MIG
    device must have its own UUID and every GPU its own PCI bus id (`checks.first_clash`)."""
    gpus: list[GpuInfo] = []
    wheres: list[str] = []
    for position, spec in enumerate(profile.gpus):
        fields = _merge(profile.defaults, spec)
        for _ in range(fields.get("count", 1)):
            gpus.append(_gpu(label, len(gpus), fields, f"gpus.{position}"))
            wheres.append(f"gpus.{position}")
    if clash := first_clash(gpus, wheres):
        raise ConfigError(f"simulated profile {label} field {clash[0]}", clash[1])
    return Node(
        gpus=tuple(gpus),
        topology=_topology(label, profile, gpus),
        driver_version=profile.driver_version,
        cuda_driver_version=profile.cuda_driver_version,
        control_devices=tuple(profile.control_devices),
        mig_minors=simulated_mig_minors(gpus, profile.mig_minors_missing),
    )


def default_bus_id(index: int) -> str:
    """A distinct, valid PCI bus id per GPU index: buses 18, 28, ... F8 for the first 15 GPUs;
    each later round of 15 is shifted by one bus (19, 29, ...), and after 8 rounds the PCI domain
    grows, so the bus number always stays a byte."""
    rounds, slot = divmod(index, 15)
    domain, shift = divmod(rounds, 8)
    return f"{domain:08X}:{0x18 + 0x10 * slot + shift:02X}:00.0"


def _gpu(label: str, index: int, f: dict[str, Any], where: str) -> GpuInfo:
    uuid = f.get("uuid") if f.get("count", 1) == 1 and f.get("uuid") else _stable_uuid("GPU", label, index)
    memory = f.get("memory_bytes") or (f.get("memory_mib") or 81559) * 2**20
    gpu = GpuInfo(
        index=index,
        uuid=str(uuid),
        minor=f.get("minor", index) if f.get("count", 1) == 1 else index,
        name=f.get("name") or "NVIDIA H100 80GB HBM3",
        pci_bus_id=f.get("pci_bus_id") or default_bus_id(index),
        memory_bytes=int(memory),
        compute_capability=f.get("compute_capability") or "9.0",
        numa_node=f.get("numa_node"),
        pci_class=f.get("pci_class", pci.CLASS_3D_CONTROLLER),
        fabric=FabricInfo(**f["fabric"]) if f.get("fabric") else None,
        vgpu=VgpuInfo(**f["vgpu"]) if f.get("vgpu") else None,
    )
    capable = f.get("mig_capable")
    gpu = replace(gpu, mig_capable=(gpu.name in MODELS or bool(f.get("mig"))) if capable is None else capable)
    spec = MigSpec.model_validate(f["mig"]) if f.get("mig") else MigSpec()
    return with_mig_layout(label, gpu, spec, f"{where}.mig")


def with_mig_layout(label: str, gpu: GpuInfo, spec: MigSpec, where: str) -> GpuInfo:
    """The GPU with MIG mode and MIG devices as `spec` says (ConfigError names the bad device)."""
    if spec.devices and not spec.enabled:
        raise ConfigError(f"simulated profile {label} field {where}.devices", "MIG devices need enabled: true")
    devices = tuple(
        _mig(label, gpu, position, m, f"{where}.devices.{position}") for position, m in enumerate(spec.devices)
    )
    slots = [m.slot for m in devices]
    if len(set(slots)) != len(slots):
        raise ConfigError(f"simulated profile {label} field {where}.devices", f"duplicate slots {slots}")
    return replace(gpu, mig_enabled=spec.enabled, mig_devices=devices)


_PROFILE_NAME = re.compile(r"^(?:(\d+)c\.)?(\d+g\.\d+gb(?:[+-][a-z.,]+)?)$")


def _mig(label: str, gpu: GpuInfo, position: int, m: MigDeviceSpec, where: str) -> MigInfo:
    def error(message: str) -> ConfigError:
        return ConfigError(f"simulated profile {label} field {where}", message)

    facts: dict[str, Any] = {}
    if m.profile is not None:
        facts = _profile_facts(gpu.name, m.profile, error)
    given = m.model_dump(exclude_none=True, exclude={"profile", "slot", "uuid", "gi_id", "ci_id"})
    facts.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    if "gi_slices" not in facts or "memory_mb" not in facts:
        raise error("give a profile name (e.g. 1g.10gb) or gi_slices and memory_mb")
    facts.setdefault("ci_slices", facts["gi_slices"])
    if facts["ci_slices"] > facts["gi_slices"]:
        raise error(f"ci_slices {facts['ci_slices']} exceeds gi_slices {facts['gi_slices']}")
    slot = m.slot if m.slot is not None else position
    gi_id = m.gi_id if m.gi_id is not None else slot + 1
    ci_id = m.ci_id if m.ci_id is not None else 0
    # Real MIG UUIDs are new for every instance created: derive ours from what was created where.
    created = (facts["gi_slices"], facts["ci_slices"], facts["memory_mb"], facts.get("attributes"))
    uuid = m.uuid or _stable_uuid("MIG", label, gpu.index, slot, gi_id, ci_id, *created)
    return MigInfo(slot=slot, uuid=uuid, gi_id=gi_id, ci_id=ci_id, **facts)


def _profile_facts(gpu_name: str, profile: str, error: Callable[[str], ConfigError]) -> dict[str, Any]:
    """NVML facts of a MIG device created with a named profile on a model in nvdp.migprofiles."""
    model = MODELS.get(gpu_name)
    if model is None:
        raise error(f"no MIG profile table for {gpu_name!r} (known: {', '.join(MODELS)}); "
                    "give gi_slices and memory_mb instead of a profile name")
    match = _PROFILE_NAME.match(profile)
    gi = model.profile(match.group(2)) if match else None
    if match is None or gi is None:
        raise error(f"unknown MIG profile {profile!r} for {gpu_name} "
                    f"(known: {', '.join(p.name for p in model.profiles)}, optionally as <C>c.<profile>)")
    ci_slices = int(match.group(1) or gi.slices)
    if not 1 <= ci_slices <= gi.slices:
        raise error(f"{profile!r}: a compute instance of {ci_slices} slices does not fit {gi.name}")
    _slices, attributes, neg_attributes = migrules.GI_PROFILE_INDEXES[gi.index]
    return {
        "gi_slices": gi.slices,
        "ci_slices": ci_slices,
        "memory_mb": gi.memory_mb,
        "attributes": attributes,
        "neg_attributes": neg_attributes,
        # A smaller compute instance gets its share of the SMs; the engines stay shared.
        "multiprocessors": gi.multiprocessors * ci_slices // gi.slices,
        "copy_engines": gi.copy_engines,
        "decoders": gi.decoders,
        "encoders": gi.encoders,
        "jpegs": gi.jpegs,
        "ofas": gi.ofas,
    }


# The driver lists every possible GPU instance (15) and compute instance (8 per GI) per GPU minor.
_GIS_PER_GPU, _CIS_PER_GI = 15, 8


def simulated_mig_minors(gpus: Sequence[GpuInfo], missing: Sequence[str] = ()) -> dict[str, int]:
    """What /proc/driver/nvidia-caps/mig-minors holds on a node with these GPUs: `config 1`,
    `monitor 2`, then per GPU minor each GI access node followed by its CI access nodes."""
    if not any(g.mig_enabled for g in gpus):
        return {}
    minors = {"config": 1, "monitor": 2}
    per_gpu = _GIS_PER_GPU * (1 + _CIS_PER_GI)
    for gpu in gpus:
        for gi in range(_GIS_PER_GPU):
            base = 3 + gpu.minor * per_gpu + gi * (1 + _CIS_PER_GI)
            minors[migrules.gi_capability(gpu.minor, gi)] = base
            for ci in range(_CIS_PER_GI):
                minors[migrules.ci_capability(gpu.minor, gi, ci)] = base + 1 + ci
    for entry in missing:
        minors.pop(entry, None)
    return minors


def _topology(label: str, profile: Profile, gpus: list[GpuInfo]) -> Topology:
    """The pair facts NVML would give: NVLink counts per pair and PCIe common-ancestor levels."""
    nvlinks: dict[frozenset[str], int] = {}
    pcie: dict[frozenset[str], PcieLevel] = {}
    for i, a in enumerate(gpus):
        for b in gpus[i + 1 :]:
            key = frozenset((a.uuid, b.uuid))
            if profile.nvlink.all_pairs:
                nvlinks[key] = profile.nvlink.all_pairs
            same = a.numa_node is not None and a.numa_node == b.numa_node
            pcie[key] = PcieLevel.SAME_NUMA_NODE if same else PcieLevel.CROSS_CPU
    for n, (x, y, links) in enumerate(profile.nvlink.pairs):
        key = _pair(label, f"nvlink.pairs.{n}", gpus, x, y)
        if links:
            nvlinks[key] = links
        else:
            nvlinks.pop(key, None)
    for n, (x, y, level) in enumerate(profile.pcie.pairs):
        pcie[_pair(label, f"pcie.pairs.{n}", gpus, x, y)] = _pcie_level(label, f"pcie.pairs.{n}", level)
    return Topology(nvlinks=nvlinks, pcie=pcie)


def _pair(label: str, where: str, gpus: list[GpuInfo], x: int, y: int) -> frozenset[str]:
    if not (0 <= x < len(gpus) and 0 <= y < len(gpus)) or x == y:
        raise ConfigError(
            f"simulated profile {label} field {where}",
            f"[{x}, {y}] must name two different GPUs among 0..{len(gpus) - 1}",
        )
    return frozenset((gpus[x].uuid, gpus[y].uuid))


def _pcie_level(label: str, where: str, name: str) -> PcieLevel:
    try:
        return PcieLevel[name.upper().replace("-", "_")]
    except KeyError:
        known = ", ".join(level.name.lower() for level in PcieLevel)
        raise ConfigError(f"simulated profile {label} field {where}", f"{name!r} is not one of {known}") from None
