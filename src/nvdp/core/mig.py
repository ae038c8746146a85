"""MIG: profile names, resource names, capability device nodes and the none/single/mixed strategies.

Pure: works on the `Node` that discovery produced; no NVML, no file access. The rules follow the
official plugin (upstream-behaviour.md section 3) except where docs/mig.md says otherwise:

- A profile is `<G>g.<GB>gb` (or `<C>c.<G>g.<GB>gb` when the compute instance is smaller than its
  GPU instance) plus `+me`, `+me.all`, `+gfx` or `-me`; GB is the MIG memory rounded up to an
  eighth of the parent GPU's memory, times the parent's memory in whole GiB (rounded up).
- `none`: every GPU is a full GPU. `single`: MIG devices and MIG-disabled GPUs all go to
  `nvidia.com/gpu`, and the node must be uniform. `mixed`: each MIG profile is its own resource
  `nvidia.com/mig-<profile>` with `+` turned into `.`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from nvdp.core.devices import Device, GpuInfo, Health, MigInfo, Node
from nvdp.errors import MigConfigError

MIG_MINORS_PATH = "/proc/driver/nvidia-caps/mig-minors"
CAPS_DEVICE_DIR = "/dev/nvidia-caps"
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"

ME, ME_ALL, GFX = "me", "me.all", "gfx"

# NVML's GPU-instance profile indexes (NVML_GPU_INSTANCE_PROFILE_*) -> (slices, attributes,
# negative attributes). The index, not the profile ID that nvidia-smi shows, carries the media
# extension and graphics variants; go-nvlib reads them the same way.
GI_PROFILE_INDEXES: Mapping[int, tuple[int, tuple[str, ...], tuple[str, ...]]] = {
    0: (1, (), ()),  # 1_SLICE
    1: (2, (), ()),  # 2_SLICE
    2: (3, (), ()),  # 3_SLICE
    3: (4, (), ()),  # 4_SLICE
    4: (7, (), ()),  # 7_SLICE
    5: (8, (), ()),  # 8_SLICE
    6: (6, (), ()),  # 6_SLICE
    7: (1, (ME,), ()),  # 1_SLICE_REV1
    8: (2, (ME,), ()),  # 2_SLICE_REV1
    9: (1, (), ()),  # 1_SLICE_REV2 (twice the memory of 1_SLICE)
    10: (1, (GFX,), ()),  # 1_SLICE_GFX
    11: (2, (GFX,), ()),  # 2_SLICE_GFX
    12: (4, (GFX,), ()),  # 4_SLICE_GFX
    13: (1, (), (ME,)),  # 1_SLICE_NO_ME
    14: (2, (), (ME,)),  # 2_SLICE_NO_ME
    15: (1, (ME_ALL,), ()),  # 1_SLICE_ALL_ME
    16: (2, (ME_ALL,), ()),  # 2_SLICE_ALL_ME
    17: (3, (GFX,), ()),  # 3_SLICE_GFX (newer than the go-nvlib the official plugin vendors)
}


# ---------------------------------------------------------------------------------------------
# Profile names


def _go_round(x: float) -> int:
    """Go's math.Round: halves away from zero (Python's round() would give 70 for 70.5)."""
    whole = math.trunc(x)
    if abs(x - whole) >= 0.5:
        whole += 1 if x > 0 else -1
    return whole


def memory_gb(parent_memory_bytes: int, mig_memory_mb: int) -> int:
    """The GB in a profile name, as go-nvlib computes it.

    The MIG device's share of its parent's memory is rounded up to a multiple of 1/8 and scaled
    by the parent's memory in GiB, itself rounded up. Floats as in Go, so the results agree.
    """
    if parent_memory_bytes <= 0:
        # NVML gave no parent memory (the official plugin would divide by zero): whole GiB instead.
        return math.ceil(mig_memory_mb / 1024)
    fraction = (mig_memory_mb * 2.0**20) / parent_memory_bytes
    fraction = math.ceil(fraction * 8) / 8
    total_gb = float((parent_memory_bytes + 2**30 - 1) // 2**30)
    return _go_round(fraction * total_gb)


@dataclass(frozen=True)
class MigProfile:
    c: int  # compute-instance slices
    g: int  # GPU-instance slices
    gb: int
    attributes: tuple[str, ...] = ()
    neg_attributes: tuple[str, ...] = ()

    def __str__(self) -> str:
        suffix = ""
        if self.attributes:
            suffix = "+" + ",".join(self.attributes)
        if self.neg_attributes:  # as go-nvlib: a negative attribute wins over positive ones
            suffix = "-" + ",".join(self.neg_attributes)
        size = f"{self.g}g.{self.gb}gb" if self.c == self.g else f"{self.c}c.{self.g}g.{self.gb}gb"
        return size + suffix

    @property
    def resource_name(self) -> str:
        """`nvidia.com/mig-<profile>` with `+` turned into `.` (resource names allow no `+`)."""
        return MIG_RESOURCE_PREFIX + str(self).replace("+", ".")

    @property
    def exposable(self) -> bool:
        """Whether the mixed strategy can serve it: the official plugin only makes resources for
        profiles whose compute instance spans its whole GPU instance."""
        return self.c == self.g


def profile_of(gpu: GpuInfo, mig: MigInfo) -> MigProfile:
    return MigProfile(
        c=mig.ci_slices,
        g=mig.gi_slices,
        gb=memory_gb(gpu.memory_bytes, mig.memory_mb),
        attributes=mig.attributes,
        neg_attributes=mig.neg_attributes,
    )


def device_type(mig: MigInfo) -> tuple[object, ...]:
    """What `single` requires to be equal on every MIG device: NVML's device attributes (as the
    official plugin compares them) plus the profile's attributes."""
    return (
        mig.gi_slices, mig.ci_slices, mig.memory_mb, mig.multiprocessors, mig.copy_engines,
        mig.decoders, mig.encoders, mig.jpegs, mig.ofas, mig.attributes, mig.neg_attributes,
    )


# ---------------------------------------------------------------------------------------------
# Capability device nodes


_MINOR_LINES = (
    (re.compile(r"^gpu(\d+)/gi(\d+)/ci(\d+)/access\s+(\d+)$"), "gpu{}/gi{}/ci{}/access"),
    (re.compile(r"^gpu(\d+)/gi(\d+)/access\s+(\d+)$"), "gpu{}/gi{}/access"),
    (re.compile(r"^config\s+(\d+)$"), "config"),
    (re.compile(r"^monitor\s+(\d+)$"), "monitor"),
)


def parse_mig_minors(text: str) -> tuple[dict[str, int], list[str]]:
    """`/proc/driver/nvidia-caps/mig-minors` -> ({"gpu0/gi1/access": 12, ...}, unparsable lines)."""
    minors: dict[str, int] = {}
    bad: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        for pattern, key in _MINOR_LINES:
            match = pattern.match(line)
            if match:
                *ids, minor = (int(g) for g in match.groups())
                minors[key.format(*ids)] = minor
                break
        else:
            bad.append(line)
    return minors, bad


def gi_capability(gpu_minor: int, gi_id: int) -> str:
    return f"gpu{gpu_minor}/gi{gi_id}/access"


def ci_capability(gpu_minor: int, gi_id: int, ci_id: int) -> str:
    return f"gpu{gpu_minor}/gi{gi_id}/ci{ci_id}/access"


def capability_paths(gpu: GpuInfo, mig: MigInfo, minors: Mapping[str, int]) -> tuple[list[str], list[str]]:
    """The GI and CI access device nodes of a MIG device, and the mig-minors entries missing."""
    paths: list[str] = []
    missing: list[str] = []
    for cap in (gi_capability(gpu.minor, mig.gi_id), ci_capability(gpu.minor, mig.gi_id, mig.ci_id)):
        if cap in minors:
            paths.append(f"{CAPS_DEVICE_DIR}/nvidia-cap{minors[cap]}")
        else:
            missing.append(cap)
    return paths, missing


def mig_device(gpu: GpuInfo, mig: MigInfo, minors: Mapping[str, int], require_caps: bool) -> Device:
    """The advertised device for one MIG device: ID = MIG UUID, index `<gpu>:<slot>`, paths = the
    parent's /dev/nvidiaN and the GI/CI access nodes.

    With `require_caps` (--pass-device-specs) a device whose capability entries are missing cannot
    be handed to a container, so it is advertised Unhealthy with the reason; the official plugin
    stops altogether instead.
    """
    caps, missing = capability_paths(gpu, mig, minors)
    device = Device(
        id=mig.uuid,
        gpu_uuid=gpu.uuid,
        index=f"{gpu.index}:{mig.slot}",
        paths=(gpu.device_path, *caps),
        numa_node=gpu.numa_node,
        mig=mig,
    )
    if missing and require_caps:
        reason = f"missing MIG capability {' and '.join(missing)} in {MIG_MINORS_PATH}"
        device = device.with_health(Health.UNHEALTHY, reason)
    return device


# ---------------------------------------------------------------------------------------------
# Strategies


@dataclass(frozen=True)
class Problem:
    """Something about the MIG layout worth a log line; the tree is still built."""

    level: Literal["warning", "error"]
    message: str
    device: str = ""


def serves_whole(gpu: GpuInfo, strategy: str) -> bool:
    """Whether a GPU is advertised as a full GPU (MIG-enabled GPUs are not, unless `none`)."""
    return strategy == "none" or not gpu.mig_enabled


def check_single(node: Node) -> None:
    """The official plugin's `single` rules, in its order; the messages start with its text."""
    mig_gpus = [g for g in node.gpus if g.mig_enabled]
    if not mig_gpus:
        return  # no MIG-enabled GPU: behaves like `none`
    for gpu in mig_gpus:
        if not gpu.mig_devices:
            raise MigConfigError(
                "invalid MIG configuration: at least one device with migEnabled=true was not configured "
                f"correctly: device {gpu.index} has no MIG devices configured"
            )
    found: dict[tuple[object, ...], str] = {}
    for gpu in mig_gpus:
        for mig in gpu.mig_devices:
            found.setdefault(device_type(mig), f"{profile_of(gpu, mig)} on GPU {gpu.index}")
    if len(found) > 1:
        raise MigConfigError(
            "invalid MIG configuration: more than one MIG device type present on node "
            f"({', '.join(found.values())}); --mig-strategy=single needs one type, use mixed"
        )
    disabled = [str(g.index) for g in node.gpus if not g.mig_enabled]
    if disabled:
        raise MigConfigError(
            "all devices on the node must be configured with the same migEnabled value "
            f"(MIG is disabled on GPU {', '.join(disabled)}); use --mig-strategy=mixed"
        )


def assign(
    node: Node, strategy: str, require_caps: bool, whole_gpu_resource: str
) -> tuple[list[tuple[str, Device]], list[Problem]]:
    """Every advertised MIG device with its resource name, and what to log about the layout.

    Raises MigConfigError where `single` cannot serve the node.
    """
    if strategy == "none":
        return [], []
    if strategy == "single":
        check_single(node)
    placed: list[tuple[str, Device]] = []
    problems: list[Problem] = []
    for gpu in node.gpus:
        if not gpu.mig_enabled:
            continue
        if not gpu.mig_devices:
            problems.append(Problem("warning", f"GPU {gpu.index} has MIG enabled but no MIG devices"))
        for mig in gpu.mig_devices:
            profile = profile_of(gpu, mig)
            device = mig_device(gpu, mig, node.mig_minors, require_caps)
            if not device.healthy:
                problems.append(Problem("error", f"MIG device unusable: {device.reason}", mig.uuid))
            if strategy == "single":
                placed.append((whole_gpu_resource, device))
            elif profile.exposable:
                placed.append((profile.resource_name, device))
            else:
                problems.append(Problem(
                    "error",
                    f"skipping MIG device on GPU {gpu.index} slot {mig.slot}: profile {profile} cannot be "
                    f"exposed with --mig-strategy=mixed (its compute instance uses {profile.c} of the GPU "
                    f"instance's {profile.g} slices); the other devices are served",
                    mig.uuid,
                ))
    return placed, problems


def profiles_on(node: Node) -> list[tuple[GpuInfo, MigInfo, MigProfile]]:
    """Every MIG device of the node with its profile (for reports)."""
    return [(g, m, profile_of(g, m)) for g in node.gpus for m in g.mig_devices]


def describe_layout(gpus: Iterable[GpuInfo]) -> str:
    """A one-line summary for logs: `0:7x1g.5gb 1:3g.20gb+2g.10gb+1g.5gb 2:off`."""
    parts = []
    for gpu in gpus:
        if not gpu.mig_enabled:
            parts.append(f"{gpu.index}:off")
            continue
        names: dict[str, int] = {}
        for mig in gpu.mig_devices:
            name = str(profile_of(gpu, mig))
            names[name] = names.get(name, 0) + 1
        text = "+".join(f"{n}x{p}" if n > 1 else p for p, n in names.items())
        parts.append(f"{gpu.index}:{text or 'empty'}")
    return " ".join(parts)
