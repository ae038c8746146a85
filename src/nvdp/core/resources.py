"""GPUs + configuration -> `DeviceTree`: which devices are advertised under which resource name.

Pure: no I/O, no NVML, no gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvdp.config.options import Config
from nvdp.core import mig
from nvdp.core.devices import Device, DeviceTree, GpuInfo, Node, Resource
from nvdp.core.limits import check_list_size, list_bytes
from nvdp.core.mps import MpsDaemon, plan_daemons
from nvdp.core.sharing import REPLICA_SEPARATOR, apply_sharing, divergences

GPU_RESOURCE = "nvidia.com/gpu"
# Re-exported: callers found these here before sharing had its own module.
__all__ = ["GPU_RESOURCE", "REPLICA_SEPARATOR", "TreePlan", "apply_sharing", "build_tree", "gpu_device", "physical_id",
           "plan_tree"]


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
    """A device tree and what is worth logging about how it was built (MIG devices skipped, sharing
    that differs from the official plugin's), and the MPS daemons its shared resources need."""

    tree: DeviceTree
    problems: tuple[mig.Problem, ...] = ()
    mps: tuple[MpsDaemon, ...] = ()


def plan_tree(node: Node, cfg: Config) -> TreePlan:
    """The resources to serve for this node and configuration.

    Raises MigConfigError when --mig-strategy=single cannot serve the node's MIG layout, and
    ConfigError when the sharing config does not fit the node (core/sharing.py, core/mps.py), or
    when a resource's device list would be over the kubelet's ListAndWatch limit (core/limits.py).
    """
    groups: dict[str, list[Device]] = {}
    for gpu in node.gpus:
        if mig.serves_whole(gpu, cfg.mig_strategy):
            groups.setdefault(GPU_RESOURCE, []).append(gpu_device(gpu))
    placed, problems = mig.assign(node, cfg.mig_strategy, cfg.pass_device_specs, GPU_RESOURCE)
    for name, device in placed:
        groups.setdefault(name, []).append(device)
    groups = apply_sharing(groups, cfg.sharing, node)
    tree = {name: Resource(name, tuple(devices)) for name, devices in groups.items() if devices}
    for resource in tree.values():
        check_list_size(resource.name, len(resource.devices), list_bytes(resource.devices))
    notes = [mig.Problem("warning", line) for line in divergences(cfg.sharing)]
    return TreePlan(tree, (*problems, *notes), plan_daemons(node, tree, cfg.sharing))


def build_tree(node: Node, cfg: Config) -> DeviceTree:
    """The resources to serve; devices are Healthy unless they cannot be used at all."""
    return plan_tree(node, cfg).tree


def physical_id(device_id: str) -> str:
    """The GPU/MIG UUID behind a device ID (a replica ID carries a `::n` suffix)."""
    return device_id.split(REPLICA_SEPARATOR, 1)[0]
