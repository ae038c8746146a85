"""GPUs + configuration -> `DeviceTree`: which devices are advertised under which resource name.

Pure: no I/O, no NVML, no gRPC.
"""

from __future__ import annotations

from dataclasses import replace

from nvdp.config import Config, Sharing
from nvdp.devices import Device, DeviceTree, GpuInfo, Node, Resource
from nvdp.errors import DiscoveryError

GPU_RESOURCE = "nvidia.com/gpu"
REPLICA_SEPARATOR = "::"


def gpu_device(gpu: GpuInfo) -> Device:
    return Device(
        id=gpu.uuid,
        gpu_uuid=gpu.uuid,
        index=str(gpu.index),
        paths=(gpu.device_path,),
        numa_node=gpu.numa_node,
    )


def build_tree(node: Node, cfg: Config) -> DeviceTree:
    """The resources to serve for this node and configuration, each device Healthy."""
    groups: dict[str, list[Device]] = {}
    for gpu in node.gpus:
        if gpu.mig_enabled and cfg.mig_strategy != "none":
            raise DiscoveryError(
                f"GPU {gpu.index} has MIG enabled; --mig-strategy={cfg.mig_strategy} is not supported yet"
            )
        groups.setdefault(GPU_RESOURCE, []).append(gpu_device(gpu))
    groups = apply_sharing(groups, cfg.sharing)
    return {name: Resource(name, tuple(devices)) for name, devices in groups.items() if devices}


def apply_sharing(groups: dict[str, list[Device]], sharing: Sharing) -> dict[str, list[Device]]:
    """Time-slicing: replace each device of a shared resource by `replicas` copies `<id>::<n>`."""
    result = dict(groups)
    for shared in sharing.resources:
        devices = groups.get(shared.name)
        if not devices:
            continue
        copies = [
            replace(d, id=f"{d.id}{REPLICA_SEPARATOR}{n}", replica=n)
            for d in devices
            for n in range(shared.replicas)
        ]
        target = shared.rename or shared.name
        if target != shared.name:
            del result[shared.name]
        result[target] = copies
    return result


def physical_id(device_id: str) -> str:
    """The GPU/MIG UUID behind a device ID (a replica ID carries a `::n` suffix)."""
    return device_id.split(REPLICA_SEPARATOR, 1)[0]
