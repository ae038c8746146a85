"""The simulated backend: a node described by a YAML profile, no GPU or driver needed.

Profiles ship with the package (`nvdp/profiles/*.yaml`, selected by name) or come from a file path.
The format is documented in docs/simulated-profiles.md; `load_profile` validates it with pydantic
and every error names the field.
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading
import uuid as uuidlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nvdp.backends.driver_root import Roots
from nvdp.backends.simulated.driver_root import SimulatedDriverRoot
from nvdp.core import mig as migrules
from nvdp.core.devices import GpuInfo, MigInfo, Node, PcieLevel, Topology
from nvdp.core.health import EventKind, HealthEvent, ProbeSample
from nvdp.core.migprofiles import MODELS
from nvdp.errors import ConfigError, EventWaitError, config_error_from

DEFAULT_CONTROL_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MigDeviceSpec(_Strict):
    """One MIG device: a profile name resolved against the GPU model's table (`1g.10gb`,
    `1g.10gb+me`, `1c.3g.40gb`), or the NVML facts given one by one; given facts override."""

    profile: str | None = None
    slot: int | None = Field(default=None, ge=0)
    uuid: str | None = None
    gi_id: int | None = Field(default=None, ge=0)
    ci_id: int | None = Field(default=None, ge=0)
    gi_slices: int | None = Field(default=None, ge=1, le=8)
    ci_slices: int | None = Field(default=None, ge=1, le=8)
    memory_mb: int | None = Field(default=None, gt=0)
    attributes: list[str] | None = None
    neg_attributes: list[str] | None = None


class MigSpec(_Strict):
    enabled: bool = False
    devices: list[MigDeviceSpec] = Field(default_factory=list)

    @field_validator("devices", mode="before")
    @classmethod
    def _profile_names(cls, value: Any) -> Any:
        # A bare string is a profile name: `devices: [1g.10gb, 1g.10gb]`.
        if isinstance(value, list):
            return [{"profile": v} if isinstance(v, str) else v for v in value]
        return value


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
    pairs: list[tuple[int, int, Annotated[int, Field(ge=0, le=18)]]] = Field(default_factory=list)  # [a, b, links]


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
    # Entries the simulated driver's /proc/driver/nvidia-caps/mig-minors lacks, e.g. "gpu1/gi2/access".
    mig_minors_missing: list[str] = Field(default_factory=list)


def builtin_profiles() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files("nvdp.backends.simulated.profiles").iterdir()
        if p.name.endswith(".yaml")
    )


def load_profile(name_or_path: str) -> tuple[str, Profile]:
    """A built-in profile by name, or a YAML file by path; errors name the field."""
    if name_or_path in builtin_profiles():
        label = name_or_path
        text = resources.files("nvdp.backends.simulated.profiles").joinpath(f"{name_or_path}.yaml").read_text()
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
            raise config_error_from(exc, f"simulated profile {label}") from exc
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
    for position, spec in enumerate(profile.gpus):
        fields = _merge(profile.defaults, spec)
        for _ in range(fields.get("count", 1)):
            gpus.append(_gpu(label, len(gpus), fields, f"gpus.{position}"))
    return Node(
        gpus=tuple(gpus),
        topology=_topology(label, profile, gpus),
        driver_version=profile.driver_version,
        cuda_driver_version=profile.cuda_driver_version,
        control_devices=tuple(profile.control_devices),
        mig_minors=simulated_mig_minors(gpus, profile.mig_minors_missing),
    )


def _gpu(label: str, index: int, f: dict[str, Any], where: str) -> GpuInfo:
    uuid = f.get("uuid") if f.get("count", 1) == 1 and f.get("uuid") else _stable_uuid("GPU", label, index)
    memory = f.get("memory_bytes") or (f.get("memory_mib") or 81559) * 2**20
    gpu = GpuInfo(
        index=index,
        uuid=str(uuid),
        minor=f.get("minor", index) if f.get("count", 1) == 1 else index,
        name=f.get("name") or "NVIDIA H100 80GB HBM3",
        pci_bus_id=f.get("pci_bus_id") or f"00000000:{0x18 + 0x10 * index:02X}:00.0",
        memory_bytes=int(memory),
        compute_capability=f.get("compute_capability") or "9.0",
        numa_node=f.get("numa_node"),
    )
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


@dataclass
class _GpuCondition:
    """What the simulated probe reports for one GPU (changed by fault injection)."""

    lost: bool = False
    volatile_uncorrected: int = 0
    remap_pending: bool = False
    remap_failed: bool = False
    retired_pending: bool = False

    def sample(self) -> ProbeSample:
        if self.lost:
            return ProbeSample(reachable=False, lost=True, error="GPU is lost (simulated)")
        return ProbeSample(
            volatile_uncorrected=self.volatile_uncorrected,
            remap_pending=self.remap_pending,
            remap_failed=self.remap_failed,
            retired_pending=self.retired_pending,
        )


class SimulatedBackend:
    """A node from a profile. `node` can be replaced at run time (fault injection, MIG changes).

    Fault injection (thread-safe; from tests, or from outside through `simcontrol`): `inject_xid`,
    `inject_ecc_event`, `lose`, `restore`, `raise_ecc`, `fail_waits`. Events go to the event
    waiter at once; conditions (lost, ECC counters, row remapping) show at the next probe.
    MIG repartitioning: `set_mig_layout` (seen by the plugin's next rescan or SIGHUP).
    """

    name = "simulated"

    def __init__(self, profile: str, driver_root: str | None = None) -> None:
        self.profile_name, self.profile = load_profile(profile)
        self._driver_root_folder = driver_root  # None: a temporary folder, made when first asked for
        self._driver_root: SimulatedDriverRoot | None = None
        self.node = build_node(self.profile_name, self.profile)
        self._lock = threading.Lock()
        self._events: queue.Queue[HealthEvent | None] = queue.Queue()
        self._wait_errors = 0
        self._conditions: dict[str, _GpuCondition] = {}

    def discover(self) -> Node:
        return self.node

    def close(self) -> None:
        self._events.put(None)  # wake a waiter, if any
        if self._driver_root is not None:
            self._driver_root.close()

    def driver_roots(self, node: Node) -> Roots:
        """The simulated driver root and dev root for this node (see `simulated.driver_root`)."""
        with self._lock:
            if self._driver_root is None:
                self._driver_root = SimulatedDriverRoot(self._driver_root_folder)
            return self._driver_root.sync(node)

    # --- health source ---------------------------------------------------------------------

    def watch_events(self, node: Node) -> SimulatedEventWaiter:
        return SimulatedEventWaiter(self)

    def probe(self, gpus: Sequence[str]) -> Mapping[str, ProbeSample]:
        with self._lock:
            return {g: self._conditions.get(g, _GpuCondition()).sample() for g in gpus}

    def _next_event(self, timeout_s: float) -> HealthEvent | None:
        with self._lock:
            if self._wait_errors > 0:
                self._wait_errors -= 1
                raise EventWaitError("nvmlEventSetWait: Unknown Error (simulated)")
        try:
            return self._events.get(timeout=timeout_s)
        except queue.Empty:
            return None

    # --- fault injection -----------------------------------------------------------------------

    def gpu_uuid(self, gpu: int | str) -> str:
        """A GPU by index or UUID; ValueError names what exists."""
        for g in self.node.gpus:
            if gpu in (g.index, g.uuid) or (isinstance(gpu, str) and gpu.isdigit() and int(gpu) == g.index):
                return g.uuid
        raise ValueError(f"no GPU {gpu!r} on the simulated node (indexes 0-{len(self.node.gpus) - 1})")

    def inject(self, event: HealthEvent) -> None:
        """Any event as it is, even one for a GPU this node does not have (for tests)."""
        self._events.put(event)

    def inject_xid(self, gpu: int | str, xid: int, gi: int | None = None, ci: int | None = None) -> HealthEvent:
        if ci is not None and gi is None:
            raise ValueError("a compute instance (ci) needs its GPU instance (gi)")
        event = HealthEvent(self.gpu_uuid(gpu), EventKind.XID, xid=xid, gi=gi, ci=ci)
        self._events.put(event)
        return event

    def inject_ecc_event(self, gpu: int | str, corrected: bool = False) -> HealthEvent:
        kind = EventKind.ECC_CORRECTED if corrected else EventKind.ECC_UNCORRECTED
        event = HealthEvent(self.gpu_uuid(gpu), kind)
        self._events.put(event)
        return event

    def _condition(self, gpu: int | str) -> _GpuCondition:
        return self._conditions.setdefault(self.gpu_uuid(gpu), _GpuCondition())

    def lose(self, gpu: int | str) -> str:
        """The GPU falls off the bus: probes fail with GPU_IS_LOST until `restore`."""
        with self._lock:
            self._condition(gpu).lost = True
        return self.gpu_uuid(gpu)

    def restore(self, gpu: int | str) -> str:
        """The GPU is back after a reset: it answers, its volatile counters and pending flags are
        clear (a row-remapping failure stays: it is a hardware defect)."""
        with self._lock:
            condition = self._condition(gpu)
            condition.lost = False
            condition.volatile_uncorrected = 0
            condition.remap_pending = False
            condition.retired_pending = False
        return self.gpu_uuid(gpu)

    def raise_ecc(
        self,
        gpu: int | str,
        count: int = 1,
        remap_pending: bool = False,
        remap_failed: bool = False,
        retired_pending: bool = False,
    ) -> str:
        """Volatile uncorrectable ECC errors rise by `count` (and flags are set), seen by the next probe."""
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        with self._lock:
            condition = self._condition(gpu)
            condition.volatile_uncorrected += count
            condition.remap_pending |= remap_pending
            condition.remap_failed |= remap_failed
            condition.retired_pending |= retired_pending
        return self.gpu_uuid(gpu)

    def fail_waits(self, count: int) -> None:
        """The next `count` event waits fail (as a wedged NVML would)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        with self._lock:
            self._wait_errors += count

    # --- MIG layout ----------------------------------------------------------------------------

    def set_mig_layout(
        self, gpu: int | str, devices: Sequence[str | Mapping[str, Any]] = (), enabled: bool = True
    ) -> GpuInfo:
        """Repartition one GPU, as mig-parted would: `set_mig_layout(1, ["3g.20gb", "2g.10gb"])`,
        `set_mig_layout(6, enabled=False)`. The plugin sees it on its next rescan or SIGHUP.

        GPU by index or UUID. Devices are profile names or MigDeviceSpec fields, numbered from slot
        0 unless given. Raises ValueError (unknown GPU) or ConfigError (a bad device, naming it);
        the node is then unchanged.
        """
        uuid = self.gpu_uuid(gpu)
        with self._lock:  # one layout change at a time; readers see the old or the new node
            return self._set_mig_layout(uuid, devices, enabled)

    def _set_mig_layout(self, uuid: str, devices: Sequence[str | Mapping[str, Any]], enabled: bool) -> GpuInfo:
        gpus = list(self.node.gpus)
        position = next(i for i, g in enumerate(gpus) if g.uuid == uuid)
        gpu_index = gpus[position].index
        try:
            spec = MigSpec.model_validate({"enabled": enabled, "devices": list(devices)})
        except ValidationError as exc:
            raise config_error_from(exc, "mig layout") from exc
        gpus[position] = with_mig_layout(self.profile_name, gpus[position], spec, f"gpu {gpu_index}")
        minors = simulated_mig_minors(gpus, self.profile.mig_minors_missing)
        self.node = replace(self.node, gpus=tuple(gpus), mig_minors=minors)
        return gpus[position]


class SimulatedEventWaiter:
    """The simulated node's event subscription (see `backend.EventWaiter`)."""

    def __init__(self, backend: SimulatedBackend) -> None:
        self._backend = backend
        self.failures: Mapping[str, str] = {}

    def wait(self, timeout_s: float) -> HealthEvent | None:
        return self._backend._next_event(timeout_s)

    def interrupt(self) -> None:
        self._backend._events.put(None)

    def close(self) -> None:
        pass
