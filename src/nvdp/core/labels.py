"""GPU feature discovery's node labels: node + config + machine type + timestamp -> labels.

Pure: the node comes from the same discovery the plugin uses (NVML or the simulated node), the
machine type is the text of the machine-type file (read by the caller), the timestamp a number.
The labels and their formats are the official GFD v0.20's (upstream-behaviour.md section 8;
docs/labels.md lists each one with its source). Where upstream's result depends on Go's map order
(several GPU models on one node), the rule here is fixed:

- MIG-disabled GPUs' labels override MIG-enabled ones' (as upstream); among models of the same
  kind, the model of the lowest-indexed GPU wins (upstream: whichever its map gives last);
- `vgpu.host-driver-*` come from the highest-indexed vGPU (upstream: the last in PCI order);
- mixed-strategy profiles are written in sorted order (each has its own keys, so order only
  matters for logs).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nvdp.config.options import Config, SharedResource, Sharing, SharingStrategy
from nvdp.core import mig, pci
from nvdp.core.devices import GpuInfo, MigInfo, Node
from nvdp.errors import LabelError

PREFIX = "nvidia.com/"
GPU_RESOURCE = "nvidia.com/gpu"
TIMESTAMP = PREFIX + "gfd.timestamp"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class SharingView:
    """What the labels need of the sharing config: the active strategy and its resources (names
    resolved; each entry keeps its block's renameByDefault, which alone decides `-SHARED`)."""

    strategy: SharingStrategy = "none"
    resources: tuple[SharedResource, ...] = ()

    def resource(self, name: str) -> SharedResource | None:
        """The first entry naming the resource (nvdp lets several entries share one resource
        between disjoint device selections; the labels describe the first, see docs/labels.md)."""
        return next((r for r in self.resources if r.name == name), None)


def sharing_view(sharing: Sharing) -> SharingView:
    """The active strategy of a loaded config, as upstream's SharingStrategy(): the block in use
    (`sharing.mps` wins over `sharing.timeSlicing`, config/file.py) when one of its resources has
    more than one replica, else none."""
    if not any(r.replicas > 1 for r in sharing.resources):
        return SharingView("none", sharing.resources)
    return SharingView(sharing.strategy, sharing.resources)


@dataclass(frozen=True)
class Labelled:
    """The labels, and the warnings worth logging about how they were chosen."""

    labels: dict[str, str]
    warnings: tuple[str, ...] = ()


def node_labels(
    node: Node,
    cfg: Config,
    machine_type: str | None,
    timestamp: int | None,
    sharing: SharingView | None = None,
) -> Labelled:
    """Every label for this node. `machine_type` is the machine-type file's text (None: it could
    not be read), `timestamp` Unix seconds (None: --no-timestamp), `sharing` defaults to the
    config's. A node without GPUs gets only the timestamp, as upstream's null manager.

    Raises LabelError where upstream GFD fails: MPS sharing with a MIG-enabled GPU, MPS replicas
    below 2, a driver version that is not X.Y[.Z], an unknown CUDA version, a bad compute capability.
    """
    warnings: list[str] = []
    labels: dict[str, str] = {}
    if node.gpus:
        view = sharing if sharing is not None else sharing_view(cfg.sharing)
        labels[PREFIX + "gpu.machine"] = UNKNOWN if machine_type is None else sanitise(machine_type.strip())
        labels.update(version_labels(node))
        labels[PREFIX + "mig.capable"] = _bool(any(g.mig_capable or g.mig_enabled for g in node.gpus))
        labels[PREFIX + "mps.capable"] = _bool(mps_capable(node, view))
        labels.update(resource_labels(node, cfg.mig_strategy, view, warnings))
        labels[PREFIX + "gpu.mode"] = gpu_mode(node.gpus)
        labels.update(clique_labels(node.gpus, warnings))
        labels.update(vgpu_labels(node.gpus))
    if timestamp is not None:
        labels[TIMESTAMP] = str(timestamp)
    return Labelled(labels, tuple(warnings))


def _bool(value: bool) -> str:
    return "true" if value else "false"


_OUTSIDE_LABEL_VALUE = re.compile(r"[^A-Za-z0-9\-_. ]")


def sanitise(text: str) -> str:
    """A name as a label value, as upstream: drop everything but letters, digits, `-`, `_`, `.`
    and spaces, then join the words with `-` ("NVIDIA H100 80GB HBM3" -> "NVIDIA-H100-80GB-HBM3")."""
    return "-".join(_OUTSIDE_LABEL_VALUE.sub("", text).split())


# ---------------------------------------------------------------------------------------------
# Versions, capabilities, mode


def version_labels(node: Node) -> dict[str, str]:
    """Driver and CUDA driver versions, in the deprecated and the current keys."""
    parts = node.driver_version.split(".")
    if not 2 <= len(parts) <= 3:
        raise LabelError(f'driver version "{node.driver_version}" does not match format "X.Y[.Z]"')
    major, minor = parts[0], parts[1]
    rev = parts[2] if len(parts) == 3 else ""
    if node.cuda_driver_version <= 0:
        raise LabelError("NVML reported no CUDA driver version")
    cuda_major = node.cuda_driver_version // 1000
    cuda_minor = node.cuda_driver_version % 1000 // 10
    return {
        PREFIX + "cuda.driver.major": major,
        PREFIX + "cuda.driver.minor": minor,
        PREFIX + "cuda.driver.rev": rev,
        PREFIX + "cuda.driver-version.major": major,
        PREFIX + "cuda.driver-version.minor": minor,
        PREFIX + "cuda.driver-version.revision": rev,
        PREFIX + "cuda.driver-version.full": node.driver_version,
        PREFIX + "cuda.runtime.major": str(cuda_major),
        PREFIX + "cuda.runtime.minor": str(cuda_minor),
        PREFIX + "cuda.runtime-version.major": str(cuda_major),
        PREFIX + "cuda.runtime-version.minor": str(cuda_minor),
        PREFIX + "cuda.runtime-version.full": f"{cuda_major}.{cuda_minor}",
    }


def mps_capable(node: Node, sharing: SharingView) -> bool:
    """True with MPS sharing; MPS on a node with a MIG-enabled GPU is an error, as upstream."""
    if sharing.strategy != "mps":
        return False
    low = [r.name for r in sharing.resources if r.replicas < 2]
    if low:
        raise LabelError(f"MPS sharing of {', '.join(low)}: number of replicas must be >= 2")
    enabled = [str(g.index) for g in node.gpus if g.mig_enabled]
    if enabled:
        raise LabelError(f"MPS sharing is not supported on MIG-enabled devices (GPU {', '.join(enabled)})")
    return True


def gpu_mode(gpus: Iterable[GpuInfo]) -> str:
    """compute (3D controller) or graphics (VGA) when every GPU has that PCI class; unknown when
    the classes differ, a class is unreadable or is another one."""
    classes = {g.pci_class for g in gpus}
    if len(classes) != 1:
        return UNKNOWN
    modes = {pci.CLASS_3D_CONTROLLER: "compute", pci.CLASS_VGA: "graphics"}
    return modes.get(classes.pop() or 0, UNKNOWN)


def clique_labels(gpus: Iterable[GpuInfo], warnings: list[str]) -> dict[str, str]:
    """`gpu.clique` = `<cluster UUID>.<clique ID>` when every fabric-attached GPU agrees on both."""
    attached = [(g.index, g.fabric) for g in gpus if g.fabric is not None]
    clusters = {f.cluster_uuid for _, f in attached}
    cliques = {f.clique_id for _, f in attached}
    if not attached:
        return {}
    if len(clusters) > 1 or len(cliques) > 1:
        seen = ", ".join(f"GPU {i}: {f.cluster_uuid}.{f.clique_id}" for i, f in attached)
        warnings.append(f"fabric cluster UUIDs or clique IDs differ between GPUs ({seen}): no gpu.clique label")
        return {}
    return {PREFIX + "gpu.clique": f"{clusters.pop()}.{cliques.pop()}"}


def vgpu_labels(gpus: Iterable[GpuInfo]) -> dict[str, str]:
    """vgpu.present, and the host driver of the highest-indexed vGPU device."""
    found = [g.vgpu for g in gpus if g.vgpu is not None]
    if not found:
        return {PREFIX + "vgpu.present": "false"}
    last = found[-1]
    return {
        PREFIX + "vgpu.present": "true",
        PREFIX + "vgpu.host-driver-version": last.host_driver_version,
        PREFIX + "vgpu.host-driver-branch": last.host_driver_branch,
    }


# ---------------------------------------------------------------------------------------------
# Resource labels: full GPUs, then the MIG strategy's


FAMILIES = {1: "tesla", 2: "fermi", 3: "kepler", 5: "maxwell", 6: "pascal", 9: "hopper", 10: "blackwell",
            12: "blackwell", 13: "rubin"}


def family(major: int, minor: int) -> str:
    """The architecture of a compute capability, as upstream names it."""
    if major == 7:
        return "volta" if minor < 5 else "turing"
    if major == 8:
        return "ampere" if minor < 9 else "ada-lovelace"
    return FAMILIES.get(major, "undefined")


def compute_capability(gpu: GpuInfo) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in gpu.compute_capability.split("."))
    except ValueError:
        cc = gpu.compute_capability
        raise LabelError(f"GPU {gpu.index}: compute capability {cc!r} is not <major>.<minor>") from None
    return major, minor


@dataclass(frozen=True)
class _Resource:
    """One resource name's labels: `<name>.<suffix>` keys, sharing as its config says (None:
    sharing does not apply, as for MIG-enabled GPUs and the MIG-INVALID labels)."""

    name: str
    sharing: SharingView | None

    def key(self, suffix: str) -> str:
        return f"{self.name}.{suffix}"

    @property
    def _shared(self) -> SharedResource | None:
        return None if self.sharing is None else self.sharing.resource(self.name)

    def replicas(self) -> int:
        if self.sharing is None:
            return 0
        shared = self._shared
        return shared.replicas if shared is not None and shared.replicas > 0 else 1

    def base(self, count: int, *parts: str) -> dict[str, str]:
        """product, count, replicas and sharing-strategy."""
        replicas = self.replicas()
        strategy = self.sharing.strategy if self.sharing is not None and replicas > 1 else "none"
        return {
            self.key("product"): self.product(*parts),
            self.key("count"): str(count),
            self.key("replicas"): str(replicas),
            self.key("sharing-strategy"): strategy,
        }

    def product(self, *parts: str) -> str:
        words = [sanitise(p) for p in parts if p]
        shared = self._shared
        # Only renameByDefault keeps a shared product from its -SHARED suffix: the official GFD
        # drops an explicit `rename` when it loads the config, so it never counts here, even
        # though nvdp's plugin serves the renamed resource (docs/labels.md, "Sharing").
        if shared is not None and shared.replicas > 1 and not shared.rename_by_default:
            words.append("SHARED")
        return "-".join(words)


def _full_gpu_labels(resource: _Resource, gpu: GpuInfo, count: int) -> dict[str, str]:
    labels = resource.base(count, gpu.name)
    memory_mib = gpu.memory_bytes // 2**20
    if memory_mib:
        labels[resource.key("memory")] = str(memory_mib)
    major, minor = compute_capability(gpu)
    if major:
        labels[resource.key("family")] = family(major, minor)
        labels[resource.key("compute.major")] = str(major)
        labels[resource.key("compute.minor")] = str(minor)
    return labels


def _mig_labels(resource: _Resource, parent: GpuInfo, device: MigInfo, profile: str, count: int) -> dict[str, str]:
    labels = resource.base(count, parent.name, "MIG", profile)
    labels.update({
        resource.key("memory"): str(device.memory_mb),  # MB, as NVML's MIG attributes give it
        resource.key("multiprocessors"): str(device.multiprocessors),
        resource.key("slices.gi"): str(device.gi_slices),
        resource.key("slices.ci"): str(device.ci_slices),
        resource.key("engines.copy"): str(device.copy_engines),
        resource.key("engines.decoder"): str(device.decoders),
        resource.key("engines.encoder"): str(device.encoders),
        resource.key("engines.jpeg"): str(device.jpegs),
        resource.key("engines.ofa"): str(device.ofas),
    })
    return labels


def resource_labels(node: Node, strategy: str, sharing: SharingView, warnings: list[str]) -> dict[str, str]:
    labels = full_gpu_labels(node.gpus, sharing, warnings)
    if strategy == "none":
        return labels
    labels[PREFIX + "mig.strategy"] = strategy
    if strategy == "single":
        labels.update(single_labels(node.gpus, sharing, warnings))
    elif strategy == "mixed":
        labels.update(mixed_labels(node.gpus, sharing))
    else:  # the option table rejects other values first
        raise LabelError(f"unknown strategy: {strategy}")
    return labels


def full_gpu_labels(gpus: tuple[GpuInfo, ...], sharing: SharingView, warnings: list[str]) -> dict[str, str]:
    """`gpu.*` of the full GPUs. `gpu.count` counts every GPU of the model, MIG-enabled or not (as
    upstream); MIG-enabled GPUs are labelled without sharing (replicas 0), MIG-disabled ones with it."""
    counts: dict[str, int] = {}
    for gpu in gpus:
        counts[gpu.name] = counts.get(gpu.name, 0) + 1
    if len(counts) > 1:
        warnings.append(f"Multiple device types detected: {', '.join(counts)}; the gpu.* labels describe "
                        f"{_winner(gpus).name} (GPU {_winner(gpus).index})")
    labels: dict[str, str] = {}
    for kind_enabled, with_sharing in ((True, None), (False, sharing)):
        # Lowest-indexed GPU of each model, applied last so the lowest-indexed model wins.
        firsts = {g.name: g for g in reversed(gpus) if g.mig_enabled is kind_enabled}
        for gpu in sorted(firsts.values(), key=lambda g: -g.index):
            labels.update(_full_gpu_labels(_Resource(GPU_RESOURCE, with_sharing), gpu, counts[gpu.name]))
    return labels


def _winner(gpus: tuple[GpuInfo, ...]) -> GpuInfo:
    """The GPU whose model the gpu.* labels describe: the first MIG-disabled one, else the first."""
    return next((g for g in gpus if not g.mig_enabled), gpus[0])


def _profiles(gpus: Iterable[GpuInfo]) -> dict[str, list[tuple[GpuInfo, MigInfo]]]:
    """MIG devices by profile name, in GPU and slot order."""
    found: dict[str, list[tuple[GpuInfo, MigInfo]]] = {}
    for gpu in gpus:
        for device in gpu.mig_devices:
            found.setdefault(str(mig.profile_of(gpu, device)), []).append((gpu, device))
    return found


def single_labels(gpus: tuple[GpuInfo, ...], sharing: SharingView, warnings: list[str]) -> dict[str, str]:
    """`single`: one MIG profile on every GPU serves as `nvidia.com/gpu`; any other MIG layout
    gives the `<model>-MIG-INVALID` labels. No MIG-enabled GPU: nothing beyond the full GPUs'."""
    enabled = [g for g in gpus if g.mig_enabled]
    if not enabled:
        return {}
    profiles = _profiles(enabled)
    reason = ""
    if any(not g.mig_devices for g in enabled):
        reason = "at least one MIG device is enabled but empty"
    elif len(enabled) != len(gpus):
        reason = "devices with MIG enabled and disabled detected"
    elif len(profiles) != 1:
        reason = f"more than one MIG device type present on node ({', '.join(profiles)})"
    if reason:
        warnings.append(f"Invalid configuration detected for mig-strategy=single: {reason}")
        return _invalid_labels(enabled[0])
    profile, devices = next(iter(profiles.items()))
    parent, device = devices[0]
    return _mig_labels(_Resource(GPU_RESOURCE, sharing), parent, device, profile, len(devices))


def _invalid_labels(gpu: GpuInfo) -> dict[str, str]:
    resource = _Resource(GPU_RESOURCE, None)
    return {
        resource.key("product"): resource.product(gpu.name, "MIG", "INVALID"),
        resource.key("count"): "0",
        resource.key("replicas"): "0",
        resource.key("sharing-strategy"): "",
        resource.key("memory"): "0",
    }


def mixed_labels(gpus: tuple[GpuInfo, ...], sharing: SharingView) -> dict[str, str]:
    """`mixed`: `mig-<profile>.*` for every MIG profile on the node (`+` written as `.`).
    MIG-enabled GPUs without MIG devices add nothing, as upstream."""
    labels: dict[str, str] = {}
    for profile, devices in sorted(_profiles(gpus).items()):
        parent, device = devices[0]
        name = mig.MIG_RESOURCE_PREFIX + profile.replace("+", ".")
        labels.update(_mig_labels(_Resource(name, sharing), parent, device, profile, len(devices)))
    return labels


def label_lines(labels: Mapping[str, str]) -> str:
    """The NFD local feature file: one `key=value` line per label, sorted by key."""
    return "".join(f"{key}={labels[key]}\n" for key in sorted(labels))
