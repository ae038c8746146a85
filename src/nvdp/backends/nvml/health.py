"""GPU health through NVML: the event set (`NvmlEventWaiter`), the periodic probe, the driver's
GPU recovery action (a field value on recent drivers) and what runs on a GPU (GPU hygiene).

Every NVML call goes through the seam (`seam.Nvml`); what a return code means here (a GPU too
old for events, a quiet wait, a lost GPU) is decided by its name, never by catching NVMLError.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from typing import Any

from nvdp.backends.nvml.seam import Nvml, text
from nvdp.core.devices import GpuInfo
from nvdp.core.health import EventKind, HealthEvent, ProbeSample
from nvdp.core.hygiene import GpuUsage
from nvdp.errors import DeviceError, EventWaitError

log = logging.getLogger("nvdp.nvml")  # stable name: operators filter on it

NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId / computeInstanceId of an event that names none
GONE = ("GPU_IS_LOST", "NOT_FOUND")  # the GPU left the bus, or NVML no longer knows the UUID
ANSWERED = ("NOT_SUPPORTED", "NO_PERMISSION")  # a clear answer from the driver, not a failure
RECOVERY_ACTION_FIELD = "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION"
# c_nvmlValue_t's member for each NVML_VALUE_TYPE_* (double, uint, ulong, ulonglong, slonglong, sint, ushort).
_VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


def field_value(value: Any) -> int | None:
    """One c_nvmlFieldValue_t as an int; None when NVML answered the field with an error (an
    older driver or a GPU without it answers NOT_SUPPORTED in the field's own return code)."""
    if int(value.nvmlReturn) != 0:
        return None
    kind = int(value.valueType)
    member = _VALUE_MEMBERS[kind] if 0 <= kind < len(_VALUE_MEMBERS) else "uiVal"
    return int(getattr(value.value, member))


def recovery_action(nv: Nvml, handle: Any, uuid: str) -> int | None:
    """The GPU recovery action the driver asks for (NVML_GPU_RECOVERY_ACTION_*), or None where
    the bindings, the driver or the GPU do not report it. Raises DeviceError when the call fails."""
    field = nv.optional_constant(RECOVERY_ACTION_FIELD)
    if field is None or not nv.has("nvmlDeviceGetFieldValues"):
        return None
    values = nv.call("nvmlDeviceGetFieldValues", handle, [field], gpu=uuid)
    return field_value(values[0]) if len(values) else None


def event_mask(nv: Nvml) -> int:
    """What we register: XID critical errors and ECC error events (single and double bit)."""
    return (nv.constant("nvmlEventTypeXidCriticalError") | nv.constant("nvmlEventTypeDoubleBitEccError")
            | nv.constant("nvmlEventTypeSingleBitEccError"))


def _handle_key(handle: Any) -> int:
    """A device handle's address, to match an event's device without calling NVML."""
    try:
        return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)
    except (TypeError, ctypes.ArgumentError):
        return id(handle)


class NvmlEventWaiter:
    """One NVML event set with every GPU of the node registered (see `backend.EventWaiter`).

    Registration follows the official plugin: mask = wanted & supported; NOT_SUPPORTED is only a
    warning (the GPU is too old for events); any other failure is recorded in `failures` and the
    GPU is marked unhealthy. If the event set cannot even be created, every `wait()` fails, so the
    wait-error back-off and threshold apply (no silent zombie node).
    """

    def __init__(self, nv: Nvml, gpus: Sequence[GpuInfo]) -> None:
        self._nv = nv
        self.failures: dict[str, str] = {}
        self._gpus: dict[int, str] = {}
        self._set: Any = None
        self._set_error = ""
        try:
            self._set = nv.create_event_set()
        except EventWaitError as exc:
            self._set_error = str(exc)
            log.error("cannot create an NVML event set", extra={"error": nv.reason(exc)})
            return
        wanted = event_mask(nv)
        for gpu in gpus:
            self._register(gpu, wanted)

    def _register(self, gpu: GpuInfo, wanted: int) -> None:
        nv = self._nv
        step = "nvmlDeviceGetHandleByUUID"
        try:
            handle = nv.call(step, gpu.uuid, gpu=gpu.uuid)
            step = "nvmlDeviceGetSupportedEventTypes"
            mask = wanted & int(nv.call(step, handle, gpu=gpu.uuid))
            step = "nvmlDeviceRegisterEvents"
            if mask:
                nv.call(step, handle, mask, self._set, gpu=gpu.uuid)
        except DeviceError as exc:
            why = f"{step}: {nv.reason(exc)}"
            if nv.failed_with(exc, "NOT_SUPPORTED"):
                log.warning("GPU too old to support health events; XIDs will not be seen",
                            extra={"device": gpu.uuid, "error": why})
                return
            self.failures[gpu.uuid] = why
            log.error("cannot register health events", extra={"device": gpu.uuid, "error": why})
            return
        if not mask:
            log.warning("GPU supports none of the health events we watch", extra={"device": gpu.uuid})
            return
        self._gpus[_handle_key(handle)] = gpu.uuid
        log.info("health events registered", extra={"device": gpu.uuid, "mask": hex(mask)})

    def wait(self, timeout_s: float) -> HealthEvent | None:
        if self._set is None:
            raise EventWaitError(self._set_error)
        data = self._nv.wait_event(self._set, max(1, int(timeout_s * 1000)))
        return None if data is None else self._event(data)

    def _event(self, data: Any) -> HealthEvent | None:
        nv = self._nv
        kind_of: list[tuple[int, EventKind]] = [
            (nv.constant("nvmlEventTypeXidCriticalError"), EventKind.XID),
            (nv.constant("nvmlEventTypeDoubleBitEccError"), EventKind.ECC_UNCORRECTED),
            (nv.constant("nvmlEventTypeSingleBitEccError"), EventKind.ECC_CORRECTED),
        ]
        kind = next((k for bit, k in kind_of if int(data.eventType) & bit), None)
        if kind is None:
            log.debug("NVML event of a type we do not watch", extra={"type": hex(int(data.eventType))})
            return None
        uuid = self._gpus.get(_handle_key(data.device))
        if uuid is None:
            named = nv.try_call("nvmlDeviceGetUUID", data.device)
            uuid = "" if named is None else text(named)  # "": reported as an event for an unknown GPU
        gi, ci = int(data.gpuInstanceId), int(data.computeInstanceId)
        action = None
        if kind is EventKind.XID and uuid:
            try:  # what the driver asks for now (XID 154 follows when it changes; the probe re-reads it)
                action = recovery_action(nv, data.device, uuid)
            except DeviceError as exc:
                log.debug("cannot read the GPU recovery action", extra={"device": uuid, "error": nv.reason(exc)})
        return HealthEvent(
            gpu=uuid,
            kind=kind,
            xid=int(data.eventData) if kind is EventKind.XID else None,
            gi=None if gi == NO_INSTANCE else gi,
            ci=None if ci == NO_INSTANCE or gi == NO_INSTANCE else ci,
            recovery_action=action,
        )

    def interrupt(self) -> None:
        pass  # an NVML wait cannot be interrupted; its timeout bounds how long stopping takes

    def close(self) -> None:
        if self._set is not None:
            self._nv.free_event_set(self._set)
            self._set = None


def probe_gpu(nv: Nvml, uuid: str) -> ProbeSample:
    """Does the GPU still answer, and what do its memory-error counters say?

    The GPU is unreachable when its handle or a basic query fails, lost when NVML says
    GPU_IS_LOST (or no longer knows the UUID). Signals a GPU does not support are None.
    """
    try:
        handle = nv.call("nvmlDeviceGetHandleByUUID", uuid, gpu=uuid)
        # A query that reaches the GPU (the handle may be cached).
        nv.call_or_none("nvmlDeviceGetMemoryInfo", handle, none_on=ANSWERED, gpu=uuid)
    except DeviceError as exc:
        return ProbeSample(reachable=False, lost=nv.failed_with(exc, *GONE), error=nv.reason(exc))

    def optional(fn: str, *args: Any) -> Any:
        """The counter, or None where the GPU does not report it; GPU_IS_LOST raises DeviceError."""
        try:
            return nv.call(fn, handle, *args, gpu=uuid)
        except DeviceError as exc:
            if nv.failed_with(exc, "GPU_IS_LOST"):
                raise
            if not nv.failed_with(exc, *ANSWERED):
                log.debug("health probe query failed", extra={"device": uuid, "error": nv.reason(exc)})
            return None

    try:
        volatile = optional("nvmlDeviceGetTotalEccErrors", nv.constant("NVML_MEMORY_ERROR_TYPE_UNCORRECTED"),
                            nv.constant("NVML_VOLATILE_ECC"))
        rows = optional("nvmlDeviceGetRemappedRows")
        retired = optional("nvmlDeviceGetRetiredPagesPendingStatus")
        try:
            action = recovery_action(nv, handle, uuid)
        except DeviceError as exc:
            if nv.failed_with(exc, "GPU_IS_LOST"):
                raise
            action = None
    except DeviceError as exc:  # only GPU_IS_LOST gets out of `optional`
        return ProbeSample(reachable=False, lost=True, error=nv.reason(exc))
    return ProbeSample(
        volatile_uncorrected=None if volatile is None else int(volatile),
        remap_pending=None if rows is None else bool(rows[2]),
        remap_failed=None if rows is None else bool(rows[3]),
        retired_pending=None if retired is None else retired == nv.constant("NVML_FEATURE_ENABLED"),
        recovery_action=action,
    )


def gpu_usage(nv: Nvml, uuid: str) -> GpuUsage:
    """Compute processes on the GPU and the memory in use. The v2 memory info separates what the
    driver reserves (about 616 MiB on an idle H200, all of v1's `used`); where only v1 exists,
    `used` includes it. Raises DeviceError when a call fails."""
    handle = nv.call("nvmlDeviceGetHandleByUUID", uuid, gpu=uuid)
    processes = nv.call("nvmlDeviceGetComputeRunningProcesses", handle, gpu=uuid)
    version = nv.optional_constant("nvmlMemory_v2")
    memory = None
    if version is not None:
        memory = nv.call_or_none("nvmlDeviceGetMemoryInfo", handle, version=version,
                                 none_on=("NOT_SUPPORTED", "FUNCTION_NOT_FOUND", "ARGUMENT_VERSION_MISMATCH"),
                                 gpu=uuid)
    if memory is None:
        memory = nv.call_or_none("nvmlDeviceGetMemoryInfo", handle, none_on=ANSWERED, gpu=uuid)
    used = None if memory is None else int(memory.used)
    return GpuUsage(pids=tuple(int(p.pid) for p in processes), memory_used_bytes=used)
