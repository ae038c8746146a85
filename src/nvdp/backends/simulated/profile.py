"""Simulated node profiles: the YAML schema (pydantic) and the loader (for a profile file; the
built-in ones are served from their precompiled form, builtin.py).

Profiles ship with the package (`profiles/*.yaml`, selected by name) or come from a file path.
The format is documented in docs/simulated-profiles.md; `load_profile` validates it and every error
names the field.
"""

from __future__ import annotations

import uuid as uuidlib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from nvdp.backends.simulated.builtin import PROFILES_PACKAGE, builtin_profiles
from nvdp.backends.simulated.checks import PCI_BUS_ID
from nvdp.config.inputs import InputFileError, read_text_file
from nvdp.core.devices import CONTROL_DEVICES
from nvdp.errors import ConfigError, config_error_from, field_in

__all__ = ["PROFILES_PACKAGE", "Profile", "builtin_profiles", "load_profile"]
# The control nodes a simulated node has unless its profile says otherwise: those of the real H200
# node in the fixtures, i.e. the candidates without /dev/nvidia-modeset (headless compute nodes
# load no modeset driver).
DEFAULT_CONTROL_DEVICES = tuple(p for p in CONTROL_DEVICES if p != "/dev/nvidia-modeset")
# libyaml's parser when PyYAML has it, as for the config file.
YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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
    enabled: StrictBool = False
    devices: list[MigDeviceSpec] = Field(default_factory=list)

    @field_validator("devices", mode="before")
    @classmethod
    def _profile_names(cls, value: Any) -> Any:
        # A bare string is a profile name: `devices: [1g.10gb, 1g.10gb]`.
        if isinstance(value, list):
            return [{"profile": v} if isinstance(v, str) else v for v in value]
        return value


class FabricSpec(_Strict):
    """A fabric-attached GPU's NVLink domain and clique (GB200 NVL72-like racks)."""

    cluster_uuid: str
    clique_id: int = Field(ge=0)

    @field_validator("cluster_uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return str(uuidlib.UUID(value))  # ValueError names a malformed UUID


class VgpuSpec(_Strict):
    """What a vGPU guest device's PCI capability says about the host's vGPU manager."""

    host_driver_version: str
    host_driver_branch: str


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
    # GPU feature discovery's facts (docs/labels.md). mig_capable: default, the model has a MIG
    # profile table or a mig block is given; pci_class: the sysfs class, default a 3D controller.
    mig_capable: bool | None = None
    pci_class: Annotated[int, Field(ge=0, le=0xFFFFFF)] | None = None
    fabric: FabricSpec | None = None
    vgpu: VgpuSpec | None = None

    @field_validator("pci_class", mode="before")
    @classmethod
    def _hex_class(cls, value: Any) -> Any:
        # Written as sysfs shows it ("0x030200") or as a YAML number.
        if isinstance(value, str):
            try:
                return int(value, 16)
            except ValueError:
                raise ValueError(f"{value!r} is not a PCI class such as 0x030200") from None
        return value

    @field_validator("pci_bus_id")
    @classmethod
    def _bus_id(cls, value: str | None) -> str | None:
        if value is not None and not PCI_BUS_ID.fullmatch(value):
            raise ValueError(f"{value!r} is not a PCI bus id like 00000000:3B:00.0 (domain:bus:device.function, hex)")
        return value

    @model_validator(mode="after")
    def _one_uuid_one_gpu(self) -> Self:
        if self.uuid is not None and self.count > 1:
            raise ValueError(f"uuid {self.uuid!r} with count {self.count}: a UUID names one GPU; give each GPU "
                             "its own entry, or drop the uuid to get generated ones")
        return self


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


def load_profile(name_or_path: str, source: str = "--simulate") -> tuple[str, Profile]:
    """A built-in profile by name, or a YAML file by path; errors name the field. `source` is how
    the profile was given (`--simulate`, `NVDP_SIMULATE`, `flags.nvdp.simulate in <file>`)."""
    if name_or_path in builtin_profiles():
        label = name_or_path
        text = resources.files(PROFILES_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text()
    else:
        path = Path(name_or_path)
        if path.is_dir():
            raise ConfigError(source, f"{name_or_path} is a directory, not a profile file")
        if not path.is_file():
            raise ConfigError(
                source,
                f"{name_or_path!r} is neither a built-in profile ({', '.join(builtin_profiles())}) nor a file",
            )
        try:
            label, text = path.stem, read_text_file(name_or_path)
        except OSError as exc:
            raise ConfigError(source, f"cannot read {name_or_path}: {exc.strerror or exc}") from exc
        except InputFileError as exc:
            raise ConfigError(source, str(exc)) from None
    try:
        return label, Profile.model_validate(yaml.load(text, Loader=YAML_LOADER))  # a safe loader
    except ValidationError as exc:
        raise config_error_from(exc, field_in(f"simulated profile {label}")) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"simulated profile {label}", f"not valid YAML: {exc}") from exc
