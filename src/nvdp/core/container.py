"""What a container gets for a set of devices: env vars, mounts, device nodes, annotations, CDI.

Follows the official plugin's Allocate answers (upstream-behaviour.md section 4) for every list
and ID strategy. Pure: the caller passes the resource snapshot and the control device nodes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nvdp.config.options import Config
from nvdp.core import mps
from nvdp.core.devices import Device, Resource
from nvdp.core.resources import physical_id
from nvdp.errors import AllocationError, UnhealthyDevice, UnknownDevice, invalid_request

VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
DEVICE_LIST_DIR = "/var/run/nvidia-container-devices"
CDI_VENDOR = "k8s.device-plugin.nvidia.com"
CDI_STRATEGIES = frozenset({"cdi-annotations", "cdi-cri"})


@dataclass(frozen=True)
class Mount:
    container_path: str
    host_path: str
    read_only: bool = False


@dataclass(frozen=True)
class DeviceSpec:
    container_path: str
    host_path: str
    permissions: str = "rw"


@dataclass(frozen=True)
class ContainerEdits:
    envs: dict[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    devices: tuple[DeviceSpec, ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)
    cdi_devices: tuple[str, ...] = ()


def requested_devices(resource: Resource, ids: Sequence[str]) -> list[Device]:
    """The requested devices, each known and healthy, in request order."""
    devices = []
    for device_id in ids:
        device = resource.by_id.get(device_id)
        if device is None:
            raise UnknownDevice(resource.name, device_id)
        if not device.healthy:
            raise UnhealthyDevice(resource.name, device_id, device.reason)
        devices.append(device)
    return devices


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def runtime_ids(devices: Sequence[Device], id_strategy: str) -> list[str]:
    """IDs handed to the runtime: UUIDs (replica suffix dropped) or indexes, duplicates removed.

    Unlike the official plugin, the `index` order is the request order, not Go map order.
    """
    if id_strategy == "index":
        return _unique([d.index for d in devices])
    return _unique([physical_id(d.id) for d in devices])


def _host_path(dev_root: str, container_path: str) -> str:
    return os.path.join(dev_root, container_path.lstrip("/")) if dev_root not in ("", "/") else container_path


def uses_cdi(cfg: Config) -> bool:
    """Whether a cdi-* list strategy is on (so nvdp writes CDI specs, app/cdi.py)."""
    return bool(set(cfg.device_list_strategy) & CDI_STRATEGIES)


def edits_repeat(cfg: Config) -> bool:
    """Whether `edits_for` gives the same answer for the same request, resource and config: not
    with cdi-annotations, whose annotation key is new for every container (as upstream's)."""
    return "cdi-annotations" not in cfg.device_list_strategy


def edits_for(
    resource: Resource,
    ids: Sequence[str],
    cfg: Config,
    control_devices: Sequence[str],
    new_annotation_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    cdi_classes: frozenset[str] | None = None,
) -> ContainerEdits:
    """Build the edits for one container request (raises AllocationError on a bad request).

    `cdi_classes`: the CDI classes whose specs nvdp wrote (`core.cdi`); a feature class missing
    from it (no device nodes on the node) is not named. None: nvdp wrote no spec, every enabled
    feature is named, as the official plugin does.
    """
    devices = requested_devices(resource, ids)
    if (
        cfg.sharing.fail_requests_greater_than_one
        and len(ids) > 1
        and any(d.replica is not None for d in devices)
    ):
        raise AllocationError(
            invalid_request(resource.name, f"maximum request size for shared resources is 1; found {len(ids)}")
        )
    ids_for_runtime = runtime_ids(devices, cfg.device_id_strategy)
    strategies = set(cfg.device_list_strategy)
    envs: dict[str, str] = {}
    annotations: dict[str, str] = {}
    cdi_devices: tuple[str, ...] = ()
    mounts: list[Mount] = []

    if strategies & CDI_STRATEGIES:
        def written(cls: str) -> bool:
            return cdi_classes is None or cls in cdi_classes

        names = [f"{CDI_VENDOR}/gpu={i}" for i in ids_for_runtime]
        if written("imex-channel"):
            names += [f"{CDI_VENDOR}/imex-channel={c}" for c in cfg.imex_channel_ids]
        features = (("gdrcopy", cfg.gdrcopy_enabled), ("gds", cfg.gds_enabled), ("mofed", cfg.mofed_enabled))
        names += [f"{CDI_VENDOR}/{cls}=all" for cls, enabled in features if enabled and written(cls)]
        if "cdi-annotations" in strategies and names:
            prefix = cfg.cdi_annotation_prefix
            annotations[f"{prefix}nvidia-device-plugin_{new_annotation_id()}"] = ",".join(names)
        if "cdi-cri" in strategies:
            cdi_devices = tuple(names)

    if cfg.sharing.strategy == "mps" and any(d.replica is not None for d in devices):
        mounts += _mps_edits(resource.name, cfg.mps_root, envs)

    for enabled, name in (
        (cfg.gdrcopy_enabled, "NVIDIA_GDRCOPY"),
        (cfg.gds_enabled, "NVIDIA_GDS"),
        (cfg.mofed_enabled, "NVIDIA_MOFED"),
    ):
        if enabled:
            envs[name] = "enabled"

    # As the official plugin: with only CDI strategies, nothing else is injected, not even specs.
    if strategies <= CDI_STRATEGIES:
        return ContainerEdits(envs=envs, mounts=tuple(mounts), annotations=annotations, cdi_devices=cdi_devices)

    if "envvar" in strategies:
        envs[VISIBLE_DEVICES] = ",".join(ids_for_runtime)
        if cfg.imex_channel_ids:
            envs["NVIDIA_IMEX_CHANNELS"] = ",".join(str(c) for c in cfg.imex_channel_ids)
    if "volume-mounts" in strategies:
        envs[VISIBLE_DEVICES] = DEVICE_LIST_DIR
        mounts += [Mount(f"{DEVICE_LIST_DIR}/{i}", "/dev/null") for i in ids_for_runtime]
        mounts += [Mount(f"{DEVICE_LIST_DIR}/imex/{c}", "/dev/null") for c in cfg.imex_channel_ids]

    specs: list[DeviceSpec] = []
    if cfg.pass_device_specs:
        paths = [*control_devices, *(p for d in devices for p in d.paths)]
        paths += [f"/dev/nvidia-caps-imex-channels/channel{c}" for c in cfg.imex_channel_ids]
        # Two replicas of one GPU name the same node; the official plugin repeats it, we do not.
        specs = [DeviceSpec(p, _host_path(cfg.dev_root, p)) for p in _unique(paths)]

    return ContainerEdits(
        envs=envs,
        mounts=tuple(mounts),
        devices=tuple(specs),
        annotations=annotations,
        cdi_devices=cdi_devices,
    )


def _mps_edits(resource: str, mps_root: str, envs: dict[str, str]) -> list[Mount]:
    """MPS clients find their resource's control daemon through its pipe folder, and talk to it
    through shared memory: the daemon's /dev/shm (a tmpfs under the MPS root)."""
    container_pipe = mps.pipe_dir(mps.CONTAINER_ROOT, resource)
    envs[mps.PIPE_ENV] = container_pipe
    return [
        Mount(container_pipe, mps.pipe_dir(mps_root, resource)),
        Mount("/dev/shm", f"{mps_root.rstrip('/')}/{mps.SHM_DIR}"),
    ]
