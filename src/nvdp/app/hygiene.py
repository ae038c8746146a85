"""GPU hygiene before hand-out (--gpu-hygiene): PreStartContainer refuses an exclusive GPU that
still has compute processes, or more memory in use than the threshold, left by a previous pod.

A dirty GPU fails the container start (FAILED_PRECONDITION with the reason; the kubelet retries
the start with back-off), is counted, and is marked Unhealthy (`dirty: ...`) until a probe finds
it clean. Shared devices (time-slicing replicas) and MIG devices are not checked
(`core.hygiene.checked`).

Timing: the kubelet gives PreStartContainer 30 s. Each GPU's query runs under the NVML deadline
(at most 20 s, `config.load.MAX_NVML_TIMEOUT_S`); after the first one that does not answer, the
other GPUs are not asked (NVML is wedged: the start is refused), and the whole check has a budget
of `BUDGET_S`, so the answer comes well within the kubelet's deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from nvdp.app.deadline import CallTimedOut
from nvdp.app.health_monitor import HealthMonitor
from nvdp.backends.base import UsageSource
from nvdp.config.options import Config
from nvdp.core.devices import Resource
from nvdp.core.health import NVML_TIMEOUT, FaultSource
from nvdp.core.hygiene import MIB, checked, dirty_reason
from nvdp.errors import DeviceError
from nvdp.ops.counters import PluginStats

log = logging.getLogger("nvdp.healthwatch")  # stable name: operators filter on it

BUDGET_S = 25.0  # the whole check; the kubelet's own deadline is 30 s


class GpuHygiene:
    """The PreStartContainer hook (`kubelet.server.PreStartHook`)."""

    def __init__(
        self, health: HealthMonitor, backend: Callable[[], object | None], config: Callable[[], Config],
        stats: PluginStats, budget_s: float = BUDGET_S,
    ) -> None:
        self._health = health
        self._backend = backend
        self._config = config
        self._stats = stats
        self._budget_s = budget_s

    async def __call__(self, resource: Resource, ids: Sequence[str]) -> str | None:
        backend = self._backend()
        if not isinstance(backend, UsageSource):
            return None  # a backend that cannot say what runs on a GPU: nothing to check
        threshold = self._config().gpu_hygiene_memory_threshold * MIB
        gpus = []
        for device_id in ids:
            device = resource.by_id.get(device_id)
            if device is not None and checked(device) and device.gpu_uuid not in gpus:
                gpus.append(device.gpu_uuid)
        problems: list[str] = []
        try:
            async with asyncio.timeout(self._budget_s):
                for gpu in gpus:
                    problem = await self._check(resource.name, backend, gpu, threshold)
                    if problem is not None:
                        problems.append(problem)
                        if problem.startswith(NVML_TIMEOUT):
                            break  # NVML is wedged: do not spend the kubelet's time on the others
        except TimeoutError:
            problems.append(f"{NVML_TIMEOUT}: the GPU hygiene check took longer than {self._budget_s:g} s")
        if not problems:
            return None
        return ("GPU hygiene (--gpu-hygiene) refused the container start: " + "; ".join(problems)
                + "; the GPU stays Unhealthy until it is clean")

    async def _check(self, resource: str, backend: UsageSource, gpu: str, threshold: int) -> str | None:
        try:
            usage = await self._health.guarded("usage", f"GPU hygiene check of {gpu}", backend, gpu,
                                               backend.usage, gpu)
        except CallTimedOut as exc:
            await self._health.mark(gpu, FaultSource.TIMEOUT, f"{NVML_TIMEOUT}: {exc}")
            self._stats.record_hygiene_refusal(resource, gpu, NVML_TIMEOUT)
            return f"{NVML_TIMEOUT}: {exc}"
        except DeviceError as exc:
            # Not known, so not refused: the health checks decide about a GPU NVML cannot describe.
            log.warning("GPU hygiene: cannot read what runs on the GPU; letting the container start",
                        extra={"device": gpu, "error": str(exc)})
            return None
        why = dirty_reason(usage, threshold)
        if not why:
            return None
        await self._health.mark(gpu, FaultSource.DIRTY, f"dirty: {why}")
        self._stats.record_hygiene_refusal(resource, gpu, "dirty")
        return f"{gpu}: {why}"
