"""The NVML event waiter and probe, against nvdp's fake pynvml (nvdp.testing.fake_nvml)."""

from __future__ import annotations

import logging
import threading

import pytest

from nvdp.backends.nvml.health import NvmlEventWaiter, event_mask, gpu_usage, probe_gpu
from nvdp.backends.nvml.seam import Nvml
from nvdp.core.devices import GpuInfo
from nvdp.core.health import EventKind, HealthEvent, ProbeSample
from nvdp.core.hygiene import GpuUsage
from nvdp.errors import DeviceError, EventWaitError
from nvdp.testing import eventually_sync
from nvdp.testing.fake_nvml import ERROR_TEXT, FakeEvent, FakeGpu, FakeNvml, FakeProcess, h200_node

U0, U1 = "GPU-0000", "GPU-1111"
XID, DOUBLE_BIT, SINGLE_BIT, PSTATE = 8, 2, 1, 4  # nvmlEventType* bits
NOT_SUPPORTED, TIMEOUT, LOST, UNKNOWN = 3, 10, 15, 999


def gpu_info(index: int, uuid: str) -> GpuInfo:
    return GpuInfo(index=index, uuid=uuid, minor=index, name="NVIDIA H200", pci_bus_id=f"00000000:0{index}:00.0",
                   memory_bytes=1, compute_capability="9.0")


GPUS = [gpu_info(0, U0), gpu_info(1, U1)]


def fake() -> FakeNvml:
    nv = FakeNvml([FakeGpu(U0, 0, "00000000:00:00.0"), FakeGpu(U1, 1, "00000000:01:00.0")])
    nv.nvmlInit()
    return nv


def waiter(nv: FakeNvml) -> NvmlEventWaiter:
    return NvmlEventWaiter(Nvml(nv), GPUS)


def test_fake_constants_and_error_texts_match_pynvml() -> None:
    import pynvml

    names = [n for n in vars(FakeNvml) if n.startswith(("NVML_", "nvmlEventType", "nvmlMemory_"))]
    assert len(names) > 40  # every constant the fake has, not a handful
    for name in names:
        assert getattr(pynvml, name) == getattr(FakeNvml, name), name
    for code in ERROR_TEXT:
        assert str(FakeNvml.NVMLError(code)) == str(pynvml.NVMLError(code)), code


def test_registers_wanted_and_supported_events_like_the_h200() -> None:
    nv = fake()
    w = waiter(nv)
    # The H200 fixture: supported 65439, registered mask 11 (XID | double-bit | single-bit ECC).
    assert event_mask(Nvml(nv)) == 11
    assert nv.registered == [(U0, 11), (U1, 11)]
    assert w.failures == {}


def test_register_masks_with_what_the_gpu_supports() -> None:
    nv = fake()
    nv.gpu(U1).supported_events = XID  # XIDs only
    waiter(nv)
    assert nv.registered == [(U0, 11), (U1, 8)]


def test_not_supported_is_only_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    nv = fake()
    nv.fail("nvmlDeviceRegisterEvents", "NOT_SUPPORTED", gpu=U1)
    with caplog.at_level(logging.WARNING):
        w = waiter(nv)
    assert w.failures == {}
    assert nv.registered == [(U0, 11)]
    assert "too old" in caplog.text


@pytest.mark.parametrize(
    "call",
    [
        pytest.param("nvmlDeviceGetHandleByUUID", id="no handle"),
        pytest.param("nvmlDeviceGetSupportedEventTypes", id="supported types"),
        pytest.param("nvmlDeviceRegisterEvents", id="register"),
    ],
)
def test_other_registration_errors_are_failures_for_that_gpu(call: str) -> None:
    nv = fake()
    nv.fail(call, "UNKNOWN", gpu=U1)
    assert waiter(nv).failures == {U1: f"{call}: Unknown Error"}


def test_event_set_creation_failure_makes_every_wait_fail() -> None:
    nv = fake()
    nv.fail("nvmlEventSetCreate", "UNKNOWN")
    w = waiter(nv)
    for _ in range(2):
        with pytest.raises(EventWaitError, match="nvmlEventSetCreate: Unknown Error"):
            w.wait(0.1)
    assert nv.called("nvmlEventSetWait_v2") == []


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        pytest.param(FakeEvent(U0, XID, 79), HealthEvent(U0, EventKind.XID, xid=79), id="XID on a full GPU"),
        pytest.param(FakeEvent(U1, XID, 94, 3, 0), HealthEvent(U1, EventKind.XID, xid=94, gi=3, ci=0),
                     id="XID naming a MIG instance"),
        pytest.param(FakeEvent(U1, XID, 94, 3, 0xFFFFFFFF), HealthEvent(U1, EventKind.XID, xid=94, gi=3),
                     id="XID naming a GPU instance only"),
        pytest.param(FakeEvent(1, XID, 13), HealthEvent(U1, EventKind.XID, xid=13), id="GPU given by index"),
        pytest.param(FakeEvent(U0, DOUBLE_BIT), HealthEvent(U0, EventKind.ECC_UNCORRECTED), id="double-bit ECC"),
        pytest.param(FakeEvent(U0, SINGLE_BIT), HealthEvent(U0, EventKind.ECC_CORRECTED), id="single-bit ECC"),
        pytest.param(FakeEvent(U0, PSTATE), None, id="a type we do not watch"),
        pytest.param(FakeEvent("GPU-5555", XID, 79), HealthEvent("", EventKind.XID, xid=79),
                     id="device NVML cannot name"),
    ],
)
def test_events_are_translated(event: FakeEvent, expected: HealthEvent | None) -> None:
    nv = fake()
    nv.post(event)
    assert waiter(nv).wait(0.5) == expected
    assert nv.wait_timeouts == [500]


def test_event_from_an_unmapped_handle_is_named_through_nvml() -> None:
    nv = fake()
    nv.fail("nvmlDeviceRegisterEvents", "NOT_SUPPORTED", gpu=U1)
    nv.post(FakeEvent(U1, XID, 48))
    assert waiter(nv).wait(1) == HealthEvent(U1, EventKind.XID, xid=48)
    assert [c.gpu for c in nv.called("nvmlDeviceGetUUID")] == [U1]


def test_timeout_is_normal_and_other_errors_raise() -> None:
    nv = fake()
    nv.post(TIMEOUT, UNKNOWN, LOST)
    w = waiter(nv)
    assert w.wait(0.001) is None
    with pytest.raises(EventWaitError, match="nvmlEventSetWait: Unknown Error"):
        w.wait(1)
    with pytest.raises(EventWaitError, match="GPU is lost"):
        w.wait(1)
    assert nv.wait_timeouts == [1, 1000, 1000]  # never a 0 ms (busy) wait


def test_a_quiet_wait_times_out_after_its_timeout() -> None:
    nv = fake()
    assert waiter(nv).wait(0.002) is None  # nothing posted: NVML's TIMEOUT once 2 ms have passed
    assert nv.wait_timeouts == [2]


def test_an_event_posted_from_another_thread_ends_a_blocked_wait() -> None:
    nv = fake()
    w = waiter(nv)
    seen: list[HealthEvent | None] = []
    thread = threading.Thread(target=lambda: seen.append(w.wait(30)))
    thread.start()
    nv.post(FakeEvent(U0, XID, 31))
    thread.join(timeout=30)
    assert seen == [HealthEvent(U0, EventKind.XID, xid=31)]  # a missed wake-up would give None


def test_close_frees_the_event_set_once() -> None:
    nv = fake()
    w = waiter(nv)
    w.interrupt()
    w.close()
    w.close()
    assert [s.freed for s in nv.event_sets] == [True]
    assert len(nv.called("nvmlEventSetFree")) == 1


# --- probe -------------------------------------------------------------------------------------

HEALTHY = ProbeSample(volatile_uncorrected=0, remap_pending=False, remap_failed=False, retired_pending=False)


@pytest.mark.parametrize(
    ("gpu", "failures", "expected"),
    [
        pytest.param({}, {}, HEALTHY, id="healthy"),
        pytest.param({"volatile_uncorrected": 3, "remapped_rows": (1, 2, 1, 0), "retired_pending": 1}, {},
                     ProbeSample(volatile_uncorrected=3, remap_pending=True, remap_failed=False, retired_pending=True),
                     id="counters and flags"),
        pytest.param({"remapped_rows": (0, 0, 0, 1)}, {},
                     ProbeSample(volatile_uncorrected=0, remap_pending=False, remap_failed=True,
                                 retired_pending=False), id="remap failure"),
        pytest.param({"retired_pending": None}, {},
                     ProbeSample(volatile_uncorrected=0, remap_pending=False, remap_failed=False),
                     id="H200: retired pages not supported"),
        pytest.param({}, {"nvmlDeviceGetTotalEccErrors": "NOT_SUPPORTED", "nvmlDeviceGetRemappedRows": "NOT_SUPPORTED",
                          "nvmlDeviceGetRetiredPagesPendingStatus": "NOT_SUPPORTED"},
                     ProbeSample(), id="no ECC at all"),
        pytest.param({}, {"nvmlDeviceGetHandleByUUID": "GPU_IS_LOST"},
                     ProbeSample(reachable=False, lost=True, error="GPU is lost"), id="lost at the handle"),
        pytest.param({}, {"nvmlDeviceGetMemoryInfo": "GPU_IS_LOST"},
                     ProbeSample(reachable=False, lost=True, error="GPU is lost"), id="lost at the first query"),
        pytest.param({}, {"nvmlDeviceGetTotalEccErrors": "GPU_IS_LOST"},
                     ProbeSample(reachable=False, lost=True, error="GPU is lost"), id="lost at the ECC query"),
        pytest.param({"lost": True}, {},
                     ProbeSample(reachable=False, lost=True, error="GPU is lost"), id="fallen off the bus"),
        pytest.param({}, {"nvmlDeviceGetMemoryInfo": "UNKNOWN"},
                     ProbeSample(reachable=False, lost=False, error="Unknown Error"), id="NVML wedged"),
        pytest.param({}, {"nvmlDeviceGetMemoryInfo": "NOT_SUPPORTED"}, HEALTHY,
                     id="memory query not supported still answers"),
        pytest.param({}, {"nvmlDeviceGetRemappedRows": "UNKNOWN"},
                     ProbeSample(volatile_uncorrected=0, retired_pending=False), id="one optional query fails"),
    ],
)
def test_probe(gpu: dict[str, object], failures: dict[str, str], expected: ProbeSample) -> None:
    nv = fake()
    for key, value in gpu.items():
        setattr(nv.gpu(U0), key, value)
    for call, code in failures.items():
        nv.fail(call, code, gpu=U0)
    assert probe_gpu(Nvml(nv), U0) == expected
    assert probe_gpu(Nvml(nv), U1) == HEALTHY  # the failures were for GPU 0 only


def test_probe_of_an_unknown_uuid_is_lost() -> None:
    sample = probe_gpu(Nvml(fake()), "GPU-gone")
    assert (sample.reachable, sample.lost, sample.error) == (False, True, "Not Found")


# --- the GPU recovery action (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION) -------------------------------


def test_the_probe_reads_the_recovery_action_where_the_driver_reports_it() -> None:
    nv = fake()
    nv.gpu(U0).recovery_action = FakeNvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET
    assert probe_gpu(Nvml(nv), U0).recovery_action == 1
    assert probe_gpu(Nvml(nv), U1).recovery_action is None  # the field answers NOT_SUPPORTED
    assert nv.called("nvmlDeviceGetFieldValues")[0].args == ((FakeNvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION,),)
    nv.fail("nvmlDeviceGetFieldValues", "UNKNOWN", gpu=U0)
    assert probe_gpu(Nvml(nv), U0) == HEALTHY  # a failing read is "not reported", not a fault
    nv.fail("nvmlDeviceGetFieldValues", "GPU_IS_LOST", gpu=U0)
    assert probe_gpu(Nvml(nv), U0).lost


def test_an_xid_event_carries_the_recovery_action_read_right_after_it() -> None:
    nv = fake()
    nv.gpu(U1).recovery_action = FakeNvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET
    nv.post(FakeEvent(U1, XID, 95), FakeEvent(U0, XID, 13), FakeEvent(U1, DOUBLE_BIT))
    w = waiter(nv)
    assert w.wait(1) == HealthEvent(U1, EventKind.XID, xid=95, recovery_action=4)
    assert w.wait(1) == HealthEvent(U0, EventKind.XID, xid=13)  # not reported on GPU 0
    assert w.wait(1) == HealthEvent(U1, EventKind.ECC_UNCORRECTED)  # only XIDs read it


def test_the_h200_fixture_reports_no_recovery_action_needed() -> None:
    nv = h200_node(1)
    nv.nvmlInit()
    assert probe_gpu(Nvml(nv), nv.gpus[0].uuid).recovery_action == FakeNvml.NVML_GPU_RECOVERY_ACTION_NONE


# --- what runs on a GPU (GPU hygiene) ------------------------------------------------------------


def test_usage_lists_compute_processes_and_memory_without_the_driver_reserve() -> None:
    nv = h200_node(2)
    nv.nvmlInit()
    idle, busy = nv.gpus
    busy.processes = (FakeProcess(4242, 3 * 2**30), FakeProcess(4243))
    busy.memory_used_bytes = 3 * 2**30
    assert gpu_usage(Nvml(nv), idle.uuid) == GpuUsage(pids=(), memory_used_bytes=0)  # v2: 616 MiB are reserved
    assert gpu_usage(Nvml(nv), busy.uuid) == GpuUsage(pids=(4242, 4243), memory_used_bytes=3 * 2**30)


def test_usage_falls_back_to_the_v1_memory_info() -> None:
    nv = h200_node(1)
    nv.nvmlInit()
    del FakeNvml.nvmlMemory_v2  # bindings older than the v2 structure
    try:
        assert gpu_usage(Nvml(nv), nv.gpus[0].uuid).memory_used_bytes == 644939776  # the fixture's v1 `used`
    finally:
        FakeNvml.nvmlMemory_v2 = 0x02000028
    with pytest.raises(DeviceError, match="GPU is lost"):
        nv.gpus[0].lost = True
        gpu_usage(Nvml(nv), nv.gpus[0].uuid)


# --- calls that hang (a wedged driver) ---------------------------------------------------------


def test_a_hung_call_blocks_until_released() -> None:
    nv = fake()
    nv.hang("nvmlDeviceGetHandleByUUID", gpu=U1)
    assert probe_gpu(Nvml(nv), U0) == HEALTHY  # another GPU's calls still answer
    done: list[ProbeSample] = []
    thread = threading.Thread(target=lambda: done.append(probe_gpu(Nvml(nv), U1)), daemon=True)
    thread.start()
    eventually_sync(lambda: nv.hanging == 1, "the probe of GPU 1 to block in the hung call")
    assert thread.is_alive() and done == []
    nv.release()
    thread.join(5)
    assert done == [HEALTHY] and nv.hanging == 0
