"""A hand-written fake of the few pynvml calls the health code uses (events and probes).

Constants carry pynvml's values (a test checks them against the installed pynvml). Handles are
ints, as ctypes can turn those into addresses like real handles. Each call can be made to fail
with an NVML error code through `errors[(call, uuid)]`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

CONSTANTS = {
    "NVML_ERROR_UNINITIALIZED": 1,
    "NVML_ERROR_NOT_SUPPORTED": 3,
    "NVML_ERROR_NO_PERMISSION": 4,
    "NVML_ERROR_NOT_FOUND": 6,
    "NVML_ERROR_TIMEOUT": 10,
    "NVML_ERROR_GPU_IS_LOST": 15,
    "NVML_ERROR_UNKNOWN": 999,
    "NVML_FEATURE_ENABLED": 1,
    "NVML_MEMORY_ERROR_TYPE_UNCORRECTED": 1,
    "NVML_VOLATILE_ECC": 0,
    "nvmlEventTypeSingleBitEccError": 1,
    "nvmlEventTypeDoubleBitEccError": 2,
    "nvmlEventTypeXidCriticalError": 8,
}
NAMES = {1: "Uninitialized", 3: "Not Supported", 4: "Insufficient Permissions", 6: "Not Found", 10: "Timeout",
         15: "GPU is lost", 999: "Unknown Error"}


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return NAMES.get(self.value, f"NVML error {self.value}")


@dataclass
class FakeGpu:
    uuid: str
    handle: int
    supported_events: int = 65439  # what the H200 fixture reports
    volatile_uncorrected: int = 0
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)
    retired_pending: int = 0


@dataclass
class EventData:
    device: Any
    eventType: int
    eventData: int = 0
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass
class FakeNvml:
    gpus: list[FakeGpu]
    errors: dict[tuple[str, str], int] = field(default_factory=dict)  # (call, uuid or "") -> code
    waits: deque[EventData | int] = field(default_factory=deque)  # what each wait returns (int: error)
    registered: list[tuple[int, int]] = field(default_factory=list)  # (handle, mask)
    freed: int = 0
    wait_timeouts: list[int] = field(default_factory=list)

    NVMLError = FakeNVMLError

    def __getattr__(self, name: str) -> Any:
        if name in CONSTANTS:
            return CONSTANTS[name]
        raise AttributeError(name)

    def _fail(self, call: str, key: str = "") -> None:
        code = self.errors.get((call, key))
        if code is not None:
            raise FakeNVMLError(code)

    def _gpu(self, handle: int) -> FakeGpu:
        return next(g for g in self.gpus if g.handle == handle)

    def nvmlEventSetCreate(self) -> str:
        self._fail("nvmlEventSetCreate")
        return "event-set"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        self._fail("nvmlDeviceGetHandleByUUID", uuid)
        gpu = next((g for g in self.gpus if g.uuid == uuid), None)
        if gpu is None:
            raise FakeNVMLError(CONSTANTS["NVML_ERROR_NOT_FOUND"])
        return gpu.handle

    def nvmlDeviceGetSupportedEventTypes(self, handle: int) -> int:
        gpu = self._gpu(handle)
        self._fail("nvmlDeviceGetSupportedEventTypes", gpu.uuid)
        return gpu.supported_events

    def nvmlDeviceRegisterEvents(self, handle: int, mask: int, event_set: str) -> None:
        assert event_set == "event-set"
        self._fail("nvmlDeviceRegisterEvents", self._gpu(handle).uuid)
        self.registered.append((handle, mask))

    def nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> EventData:
        self.wait_timeouts.append(timeout_ms)
        item = self.waits.popleft() if self.waits else CONSTANTS["NVML_ERROR_TIMEOUT"]
        if isinstance(item, int):
            raise FakeNVMLError(item)
        return item

    def nvmlEventSetFree(self, event_set: str) -> None:
        self.freed += 1

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        gpu = next((g for g in self.gpus if g.handle == handle), None)
        if gpu is None:
            raise FakeNVMLError(CONSTANTS["NVML_ERROR_GPU_IS_LOST"])
        return gpu.uuid

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> object:
        self._fail("nvmlDeviceGetMemoryInfo", self._gpu(handle).uuid)
        return object()

    def nvmlDeviceGetTotalEccErrors(self, handle: int, error_type: int, counter_type: int) -> int:
        assert (error_type, counter_type) == (1, 0)  # uncorrected, volatile
        gpu = self._gpu(handle)
        self._fail("nvmlDeviceGetTotalEccErrors", gpu.uuid)
        return gpu.volatile_uncorrected

    def nvmlDeviceGetRemappedRows(self, handle: int) -> tuple[int, int, int, int]:
        gpu = self._gpu(handle)
        self._fail("nvmlDeviceGetRemappedRows", gpu.uuid)
        return gpu.remapped_rows

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: int) -> int:
        gpu = self._gpu(handle)
        self._fail("nvmlDeviceGetRetiredPagesPendingStatus", gpu.uuid)
        return gpu.retired_pending
