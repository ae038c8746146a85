"""GPU hygiene before hand-out: is an exclusive GPU clean enough to give to a new container?

Pure: backends report a `GpuUsage` (compute processes and memory in use, read through NVML or
set on the simulated node); `dirty_reason` says why a GPU is not clean, or "" when it is.
Which devices are checked is `checked`: full GPUs handed out whole. Time-sliced replicas share
their GPU by design and are exempt; MIG devices are not checked (yet): their processes and
memory belong to one GPU instance, which the usage of the parent GPU does not tell apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvdp.core.devices import Device

MIB = 2**20


@dataclass(frozen=True)
class GpuUsage:
    """What runs on a GPU right now. `memory_used_bytes` is None where the GPU does not say."""

    pids: tuple[int, ...] = ()  # compute processes (nvmlDeviceGetComputeRunningProcesses)
    memory_used_bytes: int | None = None  # excluding what the driver reserves, where NVML separates it


def checked(device: Device) -> bool:
    """Only exclusive full GPUs are checked (see the module docstring)."""
    return device.replica is None and device.mig is None


def dirty_reason(usage: GpuUsage, threshold_bytes: int) -> str:
    """Why the GPU is not clean ("" when it is): leftover compute processes, or more memory in
    use than `threshold_bytes`."""
    why = []
    if usage.pids:
        shown = ", ".join(str(p) for p in usage.pids[:5]) + (", ..." if len(usage.pids) > 5 else "")
        why.append(f"{len(usage.pids)} compute process{'es' if len(usage.pids) > 1 else ''} running (pid {shown})")
    if usage.memory_used_bytes is not None and usage.memory_used_bytes > threshold_bytes:
        why.append(f"{usage.memory_used_bytes // MIB} MiB of memory in use (threshold {threshold_bytes // MIB} MiB)")
    return "; ".join(why)
