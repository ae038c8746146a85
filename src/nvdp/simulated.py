"""The simulated backend: a node described by a YAML profile, no GPU or driver needed.

Profiles ship with the package (`nvdp/profiles/*.yaml`, selected by name) or come from a file path.
The format is documented in docs/simulated-profiles.md; `load_profile` validates it with pydantic
and every error names the field.
"""

from __future__ import annotations

import hashlib
import uuid as uuidlib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nvdp.devices import GpuInfo, MigInfo, Node, PcieLevel, Topology
from nvdp.errors import ConfigError

DEFAULT_CONTROL_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MigDeviceSpec(_Strict):
    slot: int | None = None
    uuid: str | None = None
    gi_id: int | None = None
    ci_id: int | None = None
    gi_slices: int = Field(ge=1, le=8)
    ci_slices: int | None = Field(default=None, ge=1, le=8)
    memory_mb: int = Field(gt=0)
    attributes: list[str] = Field(default_factory=list)


class MigSpec(_Strict):
    enabled: bool = False
    devices: list[MigDeviceSpec] = Field(default_factory=list)


class GpuSpec(_Strict):
    count: int = Field(default=1, ge=1, le=64)  # repeat this entry
    name: str | None = None
    uuid: str | None = None
    minor: int | None = None
    pci_bus_id: str | None = None
    memory_mib: int | None = Field(default=None, gt=0)
    memory_bytes: int | None = Field(default=None, gt=0)
    compute_capability: str | None = None
    numa_node: int | None = None
    mig: MigSpec | None = None


class NvlinkSpec(_Strict):
    all_pairs: int = Field(default=0, ge=0, le=18)  # NVSwitch: every pair joined by this many links
    pairs: list[tuple[int, int, int]] = Field(default_factory=list)  # [a, b, links]


class PcieSpec(_Strict):
    # by-numa: same NUMA node -> SAME_NUMA_NODE, otherwise CROSS_CPU; explicit pairs override.
    default: Literal["by-numa"] | str = "by-numa"
    pairs: list[tuple[int, int, str]] = Field(default_factory=list)


class Profile(_Strict):
    description: str = ""
    driver_version: str = "580.159.04"
    cuda_driver_version: int = 13000
    control_devices: list[str] = Field(default_factory=lambda: list(DEFAULT_CONTROL_DEVICES))
    defaults: GpuSpec = Field(default_factory=GpuSpec)
    gpus: list[GpuSpec]
    nvlink: NvlinkSpec = Field(default_factory=NvlinkSpec)
    pcie: PcieSpec = Field(default_factory=PcieSpec)


def builtin_profiles() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files("nvdp.profiles").iterdir()
        if p.name.endswith(".yaml")
    )


def load_profile(name_or_path: str) -> tuple[str, Profile]:
    """A built-in profile by name, or a YAML file by path; errors name the field."""
    if name_or_path in builtin_profiles():
        label = name_or_path
        text = resources.files("nvdp.profiles").joinpath(f"{name_or_path}.yaml").read_text()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(
                "--simulate",
                f"{name_or_path!r} is neither a built-in profile ({', '.join(builtin_profiles())}) nor a file",
            )
        label, text = path.stem, path.read_text()
    try:
        return label, Profile.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as exc:
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"simulated profile {label} field {where}", first["msg"]) from exc
        raise ConfigError(f"simulated profile {label}", f"not valid YAML: {exc}") from exc


def _stable_uuid(prefix: str, *parts: Any) -> str:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return f"{prefix}-{uuidlib.UUID(bytes=digest[:16])}"


def _merge(defaults: GpuSpec, spec: GpuSpec) -> dict[str, Any]:
    merged = defaults.model_dump(exclude_unset=True)
    merged.update(spec.model_dump(exclude_unset=True))
    return merged


def build_node(label: str, profile: Profile) -> Node:
    """Expand a profile into the same `Node` the NVML backend would report."""
    gpus: list[GpuInfo] = []
    for spec in profile.gpus:
        fields = _merge(profile.defaults, spec)
        for _ in range(fields.get("count", 1)):
            gpus.append(_gpu(label, len(gpus), fields))
    return Node(
        gpus=tuple(gpus),
        topology=_topology(profile, gpus),
        driver_version=profile.driver_version,
        cuda_driver_version=profile.cuda_driver_version,
        control_devices=tuple(profile.control_devices),
    )


def _gpu(label: str, index: int, f: dict[str, Any]) -> GpuInfo:
    uuid = f.get("uuid") if f.get("count", 1) == 1 and f.get("uuid") else _stable_uuid("GPU", label, index)
    memory = f.get("memory_bytes") or (f.get("memory_mib") or 81559) * 2**20
    mig = MigSpec.model_validate(f["mig"]) if f.get("mig") else MigSpec()
    return GpuInfo(
        index=index,
        uuid=str(uuid),
        minor=f.get("minor", index) if f.get("count", 1) == 1 else index,
        name=f.get("name") or "NVIDIA H100 80GB HBM3",
        pci_bus_id=f.get("pci_bus_id") or f"00000000:{0x18 + 0x10 * index:02X}:00.0",
        memory_bytes=int(memory),
        compute_capability=f.get("compute_capability") or "9.0",
        numa_node=f.get("numa_node"),
        mig_enabled=mig.enabled,
        mig_devices=tuple(_mig(label, index, slot, m) for slot, m in enumerate(mig.devices)),
    )


def _mig(label: str, gpu_index: int, position: int, m: MigDeviceSpec) -> MigInfo:
    slot = m.slot if m.slot is not None else position
    return MigInfo(
        slot=slot,
        uuid=m.uuid or _stable_uuid("MIG", label, gpu_index, slot),
        gi_id=m.gi_id if m.gi_id is not None else slot + 1,
        ci_id=m.ci_id if m.ci_id is not None else 0,
        gi_slices=m.gi_slices,
        ci_slices=m.ci_slices or m.gi_slices,
        memory_mb=m.memory_mb,
        attributes=tuple(m.attributes),
    )


def _topology(profile: Profile, gpus: list[GpuInfo]) -> Topology:
    nvlinks: dict[frozenset[str], int] = {}
    pcie: dict[frozenset[str], PcieLevel] = {}
    for i, a in enumerate(gpus):
        for b in gpus[i + 1 :]:
            key = frozenset((a.uuid, b.uuid))
            if profile.nvlink.all_pairs:
                nvlinks[key] = profile.nvlink.all_pairs
            same = a.numa_node is not None and a.numa_node == b.numa_node
            pcie[key] = PcieLevel.SAME_NUMA_NODE if same else PcieLevel.CROSS_CPU
    for x, y, links in profile.nvlink.pairs:
        nvlinks[frozenset((gpus[x].uuid, gpus[y].uuid))] = links
    for x, y, level in profile.pcie.pairs:
        pcie[frozenset((gpus[x].uuid, gpus[y].uuid))] = PcieLevel[level.upper().replace("-", "_")]
    return Topology(nvlinks=nvlinks, pcie=pcie)


class SimulatedBackend:
    """A node from a profile. `node` can be replaced at run time (fault injection, MIG changes)."""

    name = "simulated"

    def __init__(self, profile: str) -> None:
        self.profile_name, self.profile = load_profile(profile)
        self.node = build_node(self.profile_name, self.profile)

    def discover(self) -> Node:
        return self.node

    def close(self) -> None:
        pass
