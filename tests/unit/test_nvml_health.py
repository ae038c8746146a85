"""The NVML event waiter and probe, against a hand-written fake of the pynvml calls they use."""

from __future__ import annotations

import logging
from collections import deque

import pytest

from nvdp.backends.nvml.discovery import NvmlEventWaiter, event_mask, probe_gpu
from nvdp.core.devices import GpuInfo
from nvdp.core.health import EventKind, HealthEvent, ProbeSample
from nvdp.errors import EventWaitError
from tests.unit.fake_nvml import CONSTANTS, EventData, FakeGpu, FakeNvml

U0, U1 = "GPU-0000", "GPU-1111"
NOT_SUPPORTED, TIMEOUT, LOST, UNKNOWN = 3, 10, 15, 999


def gpu_info(index: int, uuid: str) -> GpuInfo:
    return GpuInfo(index=index, uuid=uuid, minor=index, name="NVIDIA H200", pci_bus_id=f"00000000:0{index}:00.0",
                   memory_bytes=1, compute_capability="9.0")


GPUS = [gpu_info(0, U0), gpu_info(1, U1)]


def fake(**kw: object) -> FakeNvml:
    return FakeNvml(gpus=[FakeGpu(U0, 1000), FakeGpu(U1, 2000)], **kw)  # type: ignore[arg-type]


def test_fake_constants_match_pynvml() -> None:
    import pynvml

    for name, value in CONSTANTS.items():
        assert getattr(pynvml, name) == value, name


def test_registers_wanted_and_supported_events_like_the_h200() -> None:
    nv = fake()
    waiter = NvmlEventWaiter(nv, GPUS)
    # The H200 fixture: supported 65439, registered mask 11 (XID | double-bit | single-bit ECC).
    assert event_mask(nv) == 11
    assert nv.registered == [(1000, 11), (2000, 11)]
    assert waiter.failures == {}


def test_register_masks_with_what_the_gpu_supports() -> None:
    nv = fake()
    nv.gpus[1].supported_events = 8  # XIDs only
    NvmlEventWaiter(nv, GPUS)
    assert nv.registered == [(1000, 11), (2000, 8)]


def test_not_supported_is_only_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    nv = fake(errors={("nvmlDeviceRegisterEvents", U1): NOT_SUPPORTED})
    with caplog.at_level(logging.WARNING):
        waiter = NvmlEventWaiter(nv, GPUS)
    assert waiter.failures == {}
    assert nv.registered == [(1000, 11)]
    assert "too old" in caplog.text


@pytest.mark.parametrize(
    ("call", "step"),
    [
        pytest.param("nvmlDeviceGetHandleByUUID", "nvmlDeviceGetHandleByUUID", id="no handle"),
        pytest.param("nvmlDeviceGetSupportedEventTypes", "nvmlDeviceGetSupportedEventTypes", id="supported types"),
        pytest.param("nvmlDeviceRegisterEvents", "nvmlDeviceRegisterEvents", id="register"),
    ],
)
def test_other_registration_errors_are_failures_for_that_gpu(call: str, step: str) -> None:
    waiter = NvmlEventWaiter(fake(errors={(call, U1): UNKNOWN}), GPUS)
    assert waiter.failures == {U1: f"{step}: Unknown Error"}


def test_event_set_creation_failure_makes_every_wait_fail() -> None:
    waiter = NvmlEventWaiter(fake(errors={("nvmlEventSetCreate", ""): UNKNOWN}), GPUS)
    with pytest.raises(EventWaitError, match="nvmlEventSetCreate: Unknown Error"):
        waiter.wait(0.1)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(EventData(1000, 8, 79), HealthEvent(U0, EventKind.XID, xid=79), id="XID on a full GPU"),
        pytest.param(EventData(2000, 8, 94, 3, 0), HealthEvent(U1, EventKind.XID, xid=94, gi=3, ci=0),
                     id="XID naming a MIG instance"),
        pytest.param(EventData(2000, 8, 94, 3, 0xFFFFFFFF), HealthEvent(U1, EventKind.XID, xid=94, gi=3),
                     id="XID naming a GPU instance only"),
        pytest.param(EventData(1000, 2), HealthEvent(U0, EventKind.ECC_UNCORRECTED), id="double-bit ECC"),
        pytest.param(EventData(1000, 1), HealthEvent(U0, EventKind.ECC_CORRECTED), id="single-bit ECC"),
        pytest.param(EventData(1000, 4), None, id="a type we do not watch"),
        pytest.param(EventData(5555, 8, 79), HealthEvent("", EventKind.XID, xid=79), id="device NVML cannot name"),
    ],
)
def test_events_are_translated(data: EventData, expected: HealthEvent | None) -> None:
    nv = fake(waits=deque([data]))
    assert NvmlEventWaiter(nv, GPUS).wait(0.5) == expected
    assert nv.wait_timeouts == [500]


def test_event_from_an_unmapped_handle_is_named_through_nvml() -> None:
    nv = fake(errors={("nvmlDeviceRegisterEvents", U1): NOT_SUPPORTED}, waits=deque([EventData(2000, 8, 48)]))
    assert NvmlEventWaiter(nv, GPUS).wait(1) == HealthEvent(U1, EventKind.XID, xid=48)


def test_timeout_is_normal_and_other_errors_raise() -> None:
    nv = fake(waits=deque([TIMEOUT, UNKNOWN, LOST]))
    waiter = NvmlEventWaiter(nv, GPUS)
    assert waiter.wait(0.001) is None
    with pytest.raises(EventWaitError, match="nvmlEventSetWait: Unknown Error"):
        waiter.wait(1)
    with pytest.raises(EventWaitError, match="GPU is lost"):
        waiter.wait(1)
    assert nv.wait_timeouts == [1, 1000, 1000]  # never a 0 ms (busy) wait


def test_close_frees_the_event_set_once() -> None:
    nv = fake()
    waiter = NvmlEventWaiter(nv, GPUS)
    waiter.interrupt()
    waiter.close()
    waiter.close()
    assert nv.freed == 1


# --- probe -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        pytest.param({}, ProbeSample(volatile_uncorrected=0, remap_pending=False, remap_failed=False,
                                     retired_pending=False), id="healthy"),
        pytest.param({"volatile_uncorrected": 3, "remapped_rows": (1, 2, 1, 0), "retired_pending": 1},
                     ProbeSample(volatile_uncorrected=3, remap_pending=True, remap_failed=False, retired_pending=True),
                     id="counters and flags"),
        pytest.param({"remapped_rows": (0, 0, 0, 1)},
                     ProbeSample(volatile_uncorrected=0, remap_pending=False, remap_failed=True,
                                 retired_pending=False), id="remap failure"),
        pytest.param({"errors": {("nvmlDeviceGetRetiredPagesPendingStatus", U0): NOT_SUPPORTED}},
                     ProbeSample(volatile_uncorrected=0, remap_pending=False, remap_failed=False),
                     id="H200: retired pages not supported"),
        pytest.param({"errors": {("nvmlDeviceGetTotalEccErrors", U0): NOT_SUPPORTED,
                                 ("nvmlDeviceGetRemappedRows", U0): NOT_SUPPORTED,
                                 ("nvmlDeviceGetRetiredPagesPendingStatus", U0): NOT_SUPPORTED}},
                     ProbeSample(), id="no ECC at all"),
        pytest.param({"errors": {("nvmlDeviceGetHandleByUUID", U0): LOST}},
                     ProbeSample(reachable=False, lost=True, error="GPU is lost"), id="lost at the handle"),
        pytest.param({"errors": {("nvmlDeviceGetMemoryInfo", U0): LOST}},
                     ProbeSample(reachable=False, lost=True, error="GPU is lost"), id="lost at the first query"),
        pytest.param({"errors": {("nvmlDeviceGetTotalEccErrors", U0): LOST}},
                     ProbeSample(reachable=False, lost=True, error="GPU is lost"), id="lost at the ECC query"),
        pytest.param({"errors": {("nvmlDeviceGetMemoryInfo", U0): UNKNOWN}},
                     ProbeSample(reachable=False, lost=False, error="Unknown Error"), id="NVML wedged"),
        pytest.param({"errors": {("nvmlDeviceGetMemoryInfo", U0): NOT_SUPPORTED}},
                     ProbeSample(volatile_uncorrected=0, remap_pending=False, remap_failed=False,
                                 retired_pending=False), id="memory query not supported still answers"),
        pytest.param({"errors": {("nvmlDeviceGetRemappedRows", U0): UNKNOWN}},
                     ProbeSample(volatile_uncorrected=0, retired_pending=False), id="one optional query fails"),
    ],
)
def test_probe(setup: dict[str, object], expected: ProbeSample) -> None:
    nv = fake(errors=setup.pop("errors", {}))
    for key, value in setup.items():
        setattr(nv.gpus[0], key, value)
    assert probe_gpu(nv, U0) == expected


def test_probe_of_an_unknown_uuid_is_lost() -> None:
    sample = probe_gpu(fake(), "GPU-gone")
    assert (sample.reachable, sample.lost) == (False, True)
