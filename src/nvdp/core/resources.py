"""GPUs + configuration -> `DeviceTree`: which devices are advertised under which resource name.

Pure: no I/O, no NVML, no gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nvdp.config.options import Config, Sharing
from nvdp.core import mig
from nvdp.core.devices import Device, DeviceTree, GpuInfo, Node, Resource
from nvdp.core.limits import check_list_size, list_bytes, replicas_bytes

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


@dataclass(frozen=True)
class TreePlan:
    """A device tree and what is worth logging about how it was built (MIG devices skipped...)."""

    tree: DeviceTree
    problems: tuple[mig.Problem, ...] = ()


def plan_tree(node: Node, cfg: Config) -> TreePlan:
    """The resources to serve for this node and configuration.

    Raises MigConfigError when --mig-strategy=single cannot serve the node's MIG layout, and
    ConfigError when a resource's device list would be over the kubelet's ListAndWatch limit.
    """
    groups: dict[str, list[Device]] = {}
    for gpu in node.gpus:
        if mig.serves_whole(gpu, cfg.mig_strategy):
            groups.setdefault(GPU_RESOURCE, []).append(gpu_device(gpu))
    placed, problems = mig.assign(node, cfg.mig_strategy, cfg.pass_device_specs, GPU_RESOURCE)
    for name, device in placed:
        groups.setdefault(name, []).append(device)
    groups = apply_sharing(groups, cfg.sharing)
    tree = {name: Resource(name, tuple(devices)) for name, devices in groups.items() if devices}
    for resource in tree.values():
        check_list_size(resource.name, len(resource.devices), list_bytes(resource.devices))
    return TreePlan(tree, tuple(problems))


def build_tree(node: Node, cfg: Config) -> DeviceTree:
    """The resources to serve; devices are Healthy unless they cannot be used at all."""
    return plan_tree(node, cfg).tree


def apply_sharing(groups: dict[str, list[Device]], sharing: Sharing) -> dict[str, list[Device]]:
    """Time-slicing: replace each device of a shared resource by `replicas` copies `<id>::<n>`."""
    result = dict(groups)
    for shared in sharing.resources:
        devices = groups.get(shared.name)
        if not devices:
            continue
        target = shared.rename or shared.name
        # Measured before building: a list the kubelet would refuse is refused without first
        # building millions of copies.
        size = sum(replicas_bytes(d, shared.replicas) for d in devices)
        check_list_size(target, len(devices) * shared.replicas, size)
        copies = [
            replace(d, id=f"{d.id}{REPLICA_SEPARATOR}{n}", replica=n)
            for d in devices
            for n in range(shared.replicas)
        ]
        if target != shared.name:
            del result[shared.name]
        result[target] = copies
    return result


def physical_id(device_id: str) -> str:
    """The GPU/MIG UUID behind a device ID (a replica ID carries a `::n` suffix)."""
    return device_id.split(REPLICA_SEPARATOR, 1)[0]
