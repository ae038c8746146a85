"""MPS sharing: the rules that depend on the node, and what each control daemon is told.

One MPS control daemon serves one shared resource (all its GPUs), in `<root>/<resource>/pipe`
with its log in `<root>/<resource>/log`. The daemon limits every client to its share of each GPU:
`set_default_device_pinned_mem_limit <index> <memory / replicas>M` per GPU and
`set_default_active_thread_percentage <100 / replicas>`. Pure: the subprocesses live in
backends/mps.py, the daemon's supervision in app/mps_daemon.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nvdp.config.options import SharedResource, Sharing
from nvdp.core.devices import Device, Node, Resource
from nvdp.core.sharing import field_of
from nvdp.errors import ConfigError

CONTAINER_ROOT = "/mps"  # where workloads (and the chart's plugin and daemon) see the MPS root
SHM_DIR = "shm"  # <root>/shm: the tmpfs mounted at the workload's /dev/shm
READY_FILE = ".ready"  # <root>/.ready once every daemon is started
STARTED_FILE = ".started"  # <root>/<resource>/.started once that daemon is started
READINESS_COMMAND = "get_default_active_thread_percentage"
QUIT_COMMAND = "quit"
PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
MIB = 1024 * 1024


def max_clients(compute_capability: str) -> int:
    """MPS clients per GPU: 48 from Volta's successors with compute capability 7.5 on, else 16."""
    major, _, minor = compute_capability.partition(".")
    try:
        version = (int(major), int(minor or 0))
    except ValueError:
        return 16
    return 48 if version >= (7, 5) else 16


SHM_FALLBACK = "65536k"


def shm_size(meminfo: str) -> str:
    """The tmpfs size for <root>/shm: half of MemTotal, as the official `mount-shm`, else 64 MiB."""
    for line in meminfo.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key == "MemTotal" and parts and parts[0].isdigit():
            return f"{int(parts[0]) // 2}k"
    return SHM_FALLBACK


def pipe_dir(root: str, resource: str) -> str:
    return f"{root.rstrip('/')}/{resource}/pipe"


def log_dir(root: str, resource: str) -> str:
    return f"{root.rstrip('/')}/{resource}/log"


def daemon_env(root: str, resource: str) -> dict[str, str]:
    """The whole environment of a control command: only the two MPS variables (as the official plugin)."""
    return {PIPE_ENV: pipe_dir(root, resource), LOG_ENV: log_dir(root, resource)}


@dataclass(frozen=True)
class MpsGpu:
    uuid: str
    index: str  # the NVML index the daemon's limits name
    memory_bytes: int


@dataclass(frozen=True)
class MpsDaemon:
    """One control daemon: the resource it serves, its replicas per GPU and the GPUs."""

    resource: str
    replicas: int
    gpus: tuple[MpsGpu, ...]

    def settings(self) -> list[str]:
        """The commands sent once the daemon is up, in order."""
        lines = [f"set_default_device_pinned_mem_limit {g.index} {g.memory_bytes // self.replicas // MIB}M"
                 for g in self.gpus]
        lines.append(f"set_default_active_thread_percentage {self.thread_percentage}")
        return lines

    @property
    def thread_percentage(self) -> int:
        return 100 // self.replicas


def plan_daemons(node: Node, tree: Mapping[str, Resource], sharing: Sharing) -> tuple[MpsDaemon, ...]:
    """The daemons for the MPS-shared resources of a tree, after the official plugin's checks
    (MIG devices refused, replicas within the clients a GPU takes) and nvdp's own (an MPS
    resource holds only replicas: exclusive GPUs beside them would get the daemon's pipe).

    Raises ConfigError naming the entry."""
    if sharing.strategy != "mps":
        return ()
    by_target: dict[str, SharedResource] = {}
    daemons = []
    for entry in sharing.resources:
        resource = tree.get(entry.target)
        if resource is None or not any(d.replica is not None for d in resource.devices):
            continue  # the resource is not on this node
        if entry.target in by_target:
            raise ConfigError(field_of(entry, "rename"),
                              f"{entry.target} is already shared with MPS by {by_target[entry.target].where}; "
                              "one MPS daemon serves one entry: give this one its own rename")
        by_target[entry.target] = entry
        daemons.append(_daemon(node, entry, resource.devices))
    return tuple(daemons)


def _daemon(node: Node, entry: SharedResource, devices: tuple[Device, ...]) -> MpsDaemon:
    if any(d.mig is not None for d in devices):
        raise ConfigError(field_of(entry, "name"), "sharing using MPS is not supported for MIG devices")
    if any(d.replica is None for d in devices):
        raise ConfigError(
            field_of(entry, "rename"),
            f"devices shares only some GPUs of {entry.name}: give a rename, so that the exclusive GPUs are not "
            "served under the MPS resource (its clients would be pointed at a daemon that does not run them)",
        )
    gpus: dict[str, MpsGpu] = {}
    for device in devices:
        if device.gpu_uuid in gpus:
            continue
        gpu = node.gpu(device.gpu_uuid)
        memory = gpu.memory_bytes if gpu is not None else 0
        capability = gpu.compute_capability if gpu is not None else "0.0"
        limit = max_clients(capability)
        if entry.replicas > limit:
            raise ConfigError(
                field_of(entry, "replicas"),
                f"invalid MPS configuration: {entry.replicas} replicas of GPU {device.index} ({device.gpu_uuid}) "
                f"exceed the {limit} MPS clients a GPU of compute capability {capability} takes",
            )
        gpus[device.gpu_uuid] = MpsGpu(device.gpu_uuid, device.index, memory)
    return MpsDaemon(entry.target, entry.replicas, tuple(gpus.values()))
