"""A fake pynvml: the NVML calls nvdp makes, answered from plain dataclasses. No driver needed.

`FakeNvml` is a module-like object with pynvml's names (functions, constants with pynvml's
numeric values, an `NVMLError` with `.value` and pynvml's `str()`), so it can stand in for the
module wherever nvdp takes one: `NvmlBackend(nvml=FakeNvml(...))`. It covers discovery (GPUs,
driver and CUDA versions, NVLinks, PCIe ancestors, fabric cliques; `write_node_files` writes the
sysfs files beside it: NUMA node, PCI class, PCI config space), MIG (MIG devices, GPU
instances, GPU-instance profiles), health events (a queue that `nvmlEventSetWait_v2` takes
from, blocking up to its timeout), the probe's counters (ECC, remapped rows, retired pages, the
GPU recovery action field) and what runs on a GPU (compute processes, memory in use). Any call
can be made to fail with an NVML return code, for every GPU or for one (`fail`), or to hang until
released (`hang`), as a wedged driver does. It only answers queries: a call that would change a
GPU or MIG setting does not exist on it, so code that tries one fails loudly.

    fake = h200_node()                      # 8 x H200, as on an HGX H200 board
    fake.fail("nvmlDeviceGetUUID", "GPU_IS_LOST", gpu=3)
    fake.post(FakeEvent(gpu=0, event_type=FakeNvml.nvmlEventTypeXidCriticalError, data=79))
    fake.hang("nvmlDeviceGetHandleByUUID", gpu=5)   # blocks until fake.release()
    backend = NvmlBackend(nvml=fake)

Handles are the fake's own objects (a `FakeGpu` for a GPU); like real handles, they are opaque
to the caller. Thread-safety: `post` and `nvmlEventSetWait_v2` may be called from different
threads; everything else is meant to be set up by one test.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nvdp.core import mig
from nvdp.core.migprofiles import H200, GiProfile
from nvdp.core.topology import bus_key

# pynvml's text for each return code it names (other codes: "NVML Error with code N", as pynvml
# says when it cannot ask the library).
ERROR_TEXT = {
    1: "Uninitialized",
    2: "Invalid Argument",
    3: "Not Supported",
    4: "Insufficient Permissions",
    5: "Already Initialized",
    6: "Not Found",
    7: "Insufficient Size",
    8: "Insufficient External Power",
    9: "Driver Not Loaded",
    10: "Timeout",
    11: "Interrupt Request Issue",
    12: "NVML Shared Library Not Found",
    13: "Function Not Found",
    14: "Corrupted infoROM",
    15: "GPU is lost",
    16: "GPU requires restart",
    17: "The operating system has blocked the request.",
    18: "RM has detected an NVML/RM version mismatch.",
    20: "Insufficient Memory",
    999: "Unknown Error",
}


class NVMLError(Exception):
    """The fake's NVML error: `.value` is the return code, `str()` pynvml's text for it."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return ERROR_TEXT.get(self.value, f"NVML Error with code {self.value}")


# --- what the fake describes -------------------------------------------------------------------


@dataclass
class FakeMigDevice:
    """One MIG device: its GPU/compute instance, the GPU-instance profile ID the GPU instance was
    created from, and `nvmlDeviceGetAttributes` of the MIG device."""

    uuid: str
    gi_id: int
    ci_id: int
    profile_id: int
    gi_slices: int
    ci_slices: int
    memory_mb: int
    multiprocessors: int = 0
    copy_engines: int = 0
    decoders: int = 0
    encoders: int = 0
    jpegs: int = 0
    ofas: int = 0

    @classmethod
    def of_profile(cls, uuid: str, profile: GiProfile, gi_id: int, ci_id: int = 0,
                   ci_slices: int | None = None) -> FakeMigDevice:
        """A MIG device in a GPU instance of `profile`; its compute instance spans the whole
        GPU instance unless `ci_slices` says otherwise (engine counts are the profile's)."""
        slices = profile.slices if ci_slices is None else ci_slices
        return cls(uuid=uuid, gi_id=gi_id, ci_id=ci_id, profile_id=profile.id, gi_slices=profile.slices,
                   ci_slices=slices, memory_mb=profile.memory_mb,
                   multiprocessors=profile.multiprocessors * slices // profile.slices,
                   copy_engines=profile.copy_engines, decoders=profile.decoders, encoders=profile.encoders,
                   jpegs=profile.jpegs, ofas=profile.ofas)


@dataclass
class FakeNvLink:
    """One active NVLink: the PCI bus ID of its far end and what NVML says is there."""

    remote_bus_id: str
    remote_type: int = 2  # NVML_NVLINK_DEVICE_TYPE_SWITCH (GPU 0, IBM NPU 1)
    active: bool = True


@dataclass
class FakeFabric:
    """A GPU's NVLink fabric registration (`nvmlDeviceGetGpuFabricInfoV`)."""

    cluster_uuid: bytes  # 16 bytes
    clique_id: int
    state: int = 3  # NVML_GPU_FABRIC_STATE_COMPLETED
    status: int = 0  # NVML_SUCCESS


@dataclass
class FakeGpu:
    """One physical GPU. A counter left None is one the GPU does not report (NOT_SUPPORTED)."""

    uuid: str
    minor: int
    bus_id: str  # NVML form, "00000000:18:00.0"
    name: str = H200.name
    memory_bytes: int = H200.memory_bytes
    compute_capability: tuple[int, int] = (9, 0)
    numa_node: int | None = None  # what sysfs says (see `FakeNvml.write_node_files`); NVML does not
    mig_supported: bool = True  # False: nvmlDeviceGetMigMode answers NOT_SUPPORTED
    mig_enabled: bool = False
    max_mig_devices: int = 7
    mig_devices: dict[int, FakeMigDevice] = field(default_factory=dict)  # NVML slot -> device
    gi_profiles: tuple[GiProfile, ...] = H200.profiles  # by NVML profile index; others NOT_SUPPORTED
    nvlinks: tuple[FakeNvLink, ...] = ()  # none: every link query answers NOT_SUPPORTED (PCIe only)
    supported_events: int = 65439  # what the H200 of the fixture reports
    volatile_uncorrected: int | None = 0
    remapped_rows: tuple[int, int, int, int] | None = (0, 0, 0, 0)  # corrected, uncorrected, pending, failed
    retired_pending: int | None = 0  # NVML_FEATURE_ENABLED (1) when pages wait to be retired
    lost: bool = False  # fallen off the bus: every call about it answers GPU_IS_LOST
    fabric: FakeFabric | None = None  # None: the fabric info calls answer NOT_SUPPORTED
    pci_class: int | None = 0x030200  # sysfs `class` (see `write_node_files`); None: no file
    pci_config: bytes | None = None  # sysfs `config` (see `write_node_files`); None: no file
    recovery_action: int | None = None  # NVML_FI_DEV_GET_GPU_RECOVERY_ACTION; None: the field is not supported
    processes: tuple[FakeProcess, ...] = ()  # compute processes running on the GPU
    memory_reserved_bytes: int = 0  # what the driver keeps for itself (in `used` of the v1 memory info)
    memory_used_bytes: int = 0  # what processes use


@dataclass(frozen=True)
class FakeProcess:
    """One compute process on a GPU, as nvmlDeviceGetComputeRunningProcesses lists it."""

    pid: int
    used_memory_bytes: int = 0


@dataclass(frozen=True)
class FakeEvent:
    """One event `nvmlEventSetWait_v2` hands out. `gpu` is a UUID or index; one the fake does not
    know gives a device handle NVML cannot name."""

    gpu: str | int
    event_type: int
    data: int = 0  # the XID, for an XID event
    gpu_instance: int = 0xFFFFFFFF  # 0xFFFFFFFF: none
    compute_instance: int = 0xFFFFFFFF


@dataclass(frozen=True)
class FakeCall:
    """One call the fake answered: its name, the GPU it was about (UUID), its other arguments."""

    name: str
    gpu: str | None
    args: tuple[object, ...] = ()


# --- what pynvml returns (its structures' field names, hence camelCase) -----------------------------------------


@dataclass(frozen=True)
class PciInfo:
    busId: str
    busIdLegacy: str


@dataclass(frozen=True)
class MemoryInfo:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class MemoryInfoV2:
    version: int
    total: int
    reserved: int
    free: int
    used: int


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    usedGpuMemory: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass(frozen=True)
class FieldValueData:
    """The value union of c_nvmlFieldValue_t (the members nvdp reads)."""

    uiVal: int = 0
    ulVal: int = 0
    ullVal: int = 0
    siVal: int = 0
    sllVal: int = 0
    usVal: int = 0
    dVal: float = 0.0


@dataclass(frozen=True)
class FieldValue:
    fieldId: int
    scopeId: int
    timestamp: int
    latencyUsec: int
    valueType: int
    nvmlReturn: int
    value: FieldValueData


@dataclass(frozen=True)
class DeviceAttributes:
    multiprocessorCount: int
    sharedCopyEngineCount: int
    sharedDecoderCount: int
    sharedEncoderCount: int
    sharedJpegCount: int
    sharedOfaCount: int
    gpuInstanceSliceCount: int
    computeInstanceSliceCount: int
    memorySizeMB: int


@dataclass(frozen=True)
class GpuInstanceInfo:
    id: int
    profileId: int


@dataclass(frozen=True)
class GpuInstanceProfileInfo:
    id: int
    sliceCount: int
    instanceCount: int
    multiprocessorCount: int
    copyEngineCount: int
    decoderCount: int
    encoderCount: int
    jpegCount: int
    ofaCount: int
    memorySizeMB: int
    version: int = 2


@dataclass(frozen=True)
class EventData:
    device: object
    eventType: int
    eventData: int
    gpuInstanceId: int
    computeInstanceId: int


class GpuFabricInfo:
    """pynvml's c_nvmlGpuFabricInfo_t / c_nvmlGpuFabricInfoV_t, filled by the fabric info calls."""

    def __init__(self) -> None:
        self.clusterUuid = bytes(16)
        self.status = 0
        self.cliqueId = 0
        self.state = 0  # NVML_GPU_FABRIC_STATE_NOT_SUPPORTED


@dataclass(frozen=True, eq=False)
class MigHandle:
    gpu: FakeGpu
    slot: int


@dataclass(frozen=True, eq=False)
class GpuInstanceHandle:
    gpu: FakeGpu
    gi_id: int


@dataclass(frozen=True, eq=False)
class UnknownHandle:
    """A device handle NVML cannot name (an event of a device that is not on the node)."""

    label: str


@dataclass(eq=False)
class FakeEventSet:
    registered: list[tuple[str, int]] = field(default_factory=list)  # (GPU UUID, mask)
    freed: bool = False



class FakeNvml:
    """The fake pynvml module over a list of `FakeGpu` (see the module docstring)."""

    NVMLError = NVMLError

    # Return codes (pynvml's values).
    NVML_SUCCESS = 0
    NVML_ERROR_UNINITIALIZED = 1
    NVML_ERROR_INVALID_ARGUMENT = 2
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NO_PERMISSION = 4
    NVML_ERROR_ALREADY_INITIALIZED = 5
    NVML_ERROR_NOT_FOUND = 6
    NVML_ERROR_INSUFFICIENT_SIZE = 7
    NVML_ERROR_INSUFFICIENT_POWER = 8
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_TIMEOUT = 10
    NVML_ERROR_IRQ_ISSUE = 11
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_FUNCTION_NOT_FOUND = 13
    NVML_ERROR_CORRUPTED_INFOROM = 14
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_ERROR_RESET_REQUIRED = 16
    NVML_ERROR_OPERATING_SYSTEM = 17
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
    NVML_ERROR_IN_USE = 19
    NVML_ERROR_MEMORY = 20
    NVML_ERROR_NO_DATA = 21
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
    NVML_ERROR_UNKNOWN = 999

    NVML_FEATURE_DISABLED = 0
    NVML_FEATURE_ENABLED = 1
    NVML_DEVICE_MIG_DISABLE = 0
    NVML_DEVICE_MIG_ENABLE = 1
    NVML_GPU_INSTANCE_PROFILE_COUNT = 18
    NVML_NVLINK_MAX_LINKS = 36
    NVML_NVLINK_DEVICE_TYPE_GPU = 0
    NVML_NVLINK_DEVICE_TYPE_IBMNPU = 1
    NVML_NVLINK_DEVICE_TYPE_SWITCH = 2
    NVML_NVLINK_DEVICE_TYPE_UNKNOWN = 0xFF
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    NVML_AGGREGATE_ECC = 1
    NVML_TOPOLOGY_INTERNAL = 0
    NVML_TOPOLOGY_SINGLE = 10
    NVML_TOPOLOGY_MULTIPLE = 20
    NVML_TOPOLOGY_HOSTBRIDGE = 30
    NVML_TOPOLOGY_NODE = 40
    NVML_TOPOLOGY_SYSTEM = 50
    NVML_GPU_FABRIC_STATE_NOT_SUPPORTED = 0
    NVML_GPU_FABRIC_STATE_NOT_STARTED = 1
    NVML_GPU_FABRIC_STATE_IN_PROGRESS = 2
    NVML_GPU_FABRIC_STATE_COMPLETED = 3
    c_nvmlGpuFabricInfo_t = GpuFabricInfo
    c_nvmlGpuFabricInfoV_t = GpuFabricInfo
    NVML_VALUE_TYPE_DOUBLE = 0
    NVML_VALUE_TYPE_UNSIGNED_INT = 1
    NVML_VALUE_TYPE_UNSIGNED_LONG = 2
    NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
    NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4
    NVML_VALUE_TYPE_SIGNED_INT = 5
    NVML_VALUE_TYPE_UNSIGNED_SHORT = 6
    NVML_FI_DEV_GET_GPU_RECOVERY_ACTION = 230
    NVML_GPU_RECOVERY_ACTION_NONE = 0
    NVML_GPU_RECOVERY_ACTION_GPU_RESET = 1
    NVML_GPU_RECOVERY_ACTION_NODE_REBOOT = 2
    NVML_GPU_RECOVERY_ACTION_DRAIN_P2P = 3
    NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET = 4
    nvmlMemory_v2 = 0x02000028

    nvmlEventTypeSingleBitEccError = 0x1
    nvmlEventTypeDoubleBitEccError = 0x2
    nvmlEventTypePState = 0x4
    nvmlEventTypeXidCriticalError = 0x8
    nvmlEventTypeClock = 0x10

    def __init__(
        self,
        gpus: Sequence[FakeGpu],
        driver_version: str = "580.159.04",
        cuda_driver_version: int = 13000,
        pcie_levels: Mapping[frozenset[str], int] | None = None,
        default_pcie_level: int = NVML_TOPOLOGY_NODE,
        profile_info_v2: bool = True,
    ) -> None:
        self.gpus = list(gpus)
        self.driver_version = driver_version
        self.cuda_driver_version = cuda_driver_version
        # nvmlDeviceGetTopologyCommonAncestor by pair of UUIDs; other pairs get the default.
        self.pcie_levels: dict[frozenset[str], int] = dict(pcie_levels or {})
        self.default_pcie_level = default_pcie_level
        self.profile_info_v2 = profile_info_v2  # False: a driver before nvmlDeviceGetGpuInstanceProfileInfoV
        self.nvmlLib: object | None = object()  # "library loaded": the backend opens no real library
        self.initialised = 0  # nvmlInit calls not yet matched by nvmlShutdown
        self.failures: dict[tuple[str, str | None], int] = {}  # (call, GPU UUID or None) -> code
        self.calls: list[FakeCall] = []
        self.event_sets: list[FakeEventSet] = []
        self.wait_timeouts: list[int] = []  # the timeout of every nvmlEventSetWait_v2, in ms
        self._events: deque[FakeEvent | int] = deque()
        self._events_changed = threading.Condition()
        self.hangs: dict[tuple[str, str | None], threading.Event] = {}  # (call, GPU UUID or None) -> release
        self._hanging = 0
        self._hang_lock = threading.Lock()

    # --- set-up ----------------------------------------------------------------------------------

    def gpu(self, which: str | int) -> FakeGpu:
        """A GPU by UUID or index."""
        for index, gpu in enumerate(self.gpus):
            if which in (gpu.uuid, index):
                return gpu
        raise KeyError(which)

    def fail(self, call: str, code: int | str, gpu: str | int | None = None) -> None:
        """Make `call` answer an NVML return code (a value, or a name such as "NOT_SUPPORTED"):
        for every GPU, or only for `gpu` (UUID or index; for a MIG device, its parent GPU)."""
        value = code if isinstance(code, int) else int(getattr(self, f"NVML_ERROR_{code}"))
        self.failures[(call, None if gpu is None else self.gpu(gpu).uuid)] = value

    def heal(self, call: str, gpu: str | int | None = None) -> None:
        """Undo one `fail`."""
        self.failures.pop((call, None if gpu is None else self.gpu(gpu).uuid), None)

    def hang(self, call: str, gpu: str | int | None = None) -> None:
        """Make `call` block (for every GPU, or only for `gpu`) until `release`, as a call into a
        wedged driver does. The call is recorded in `calls` before it blocks."""
        with self._hang_lock:
            self.hangs[(call, None if gpu is None else self.gpu(gpu).uuid)] = threading.Event()

    def release(self, call: str | None = None, gpu: str | int | None = None) -> None:
        """Let hung calls return (all of them, or those of one `hang`), and stop hanging them."""
        key = None if call is None else (call, None if gpu is None else self.gpu(gpu).uuid)
        with self._hang_lock:
            for k in [k for k in self.hangs if key is None or k == key]:
                self.hangs.pop(k).set()

    @property
    def hanging(self) -> int:
        """Calls blocked in a hang right now."""
        with self._hang_lock:
            return self._hanging

    def _block_if_hung(self, call: str, uuid: str | None) -> None:
        with self._hang_lock:
            release = self.hangs.get((call, uuid)) or self.hangs.get((call, None))
            if release is None:
                return
            self._hanging += 1
        release.wait()
        with self._hang_lock:
            self._hanging -= 1

    def post(self, *events: FakeEvent | int) -> None:
        """Queue what the next waits return, in order: an event, or an NVML return code that
        wait answers with. Wakes a wait blocked in another thread."""
        with self._events_changed:
            self._events.extend(events)
            self._events_changed.notify_all()

    @property
    def registered(self) -> list[tuple[str, int]]:
        """(GPU UUID, mask) of every nvmlDeviceRegisterEvents, in order."""
        return [entry for event_set in self.event_sets for entry in event_set.registered]

    def called(self, name: str) -> list[FakeCall]:
        return [c for c in self.calls if c.name == name]

    def write_node_files(self, root: Path) -> None:
        """The node files discovery reads beside NVML, under `root`: each GPU's NUMA node, PCI
        class and PCI config space in sysfs (`sysfs_root=root`) and, when a GPU has MIG enabled,
        the driver's mig-minors (`driver_root=root`), numbered as the driver does (15 GPU
        instances of 8 compute instances each per GPU minor)."""
        for gpu in self.gpus:
            folder = root / "bus/pci/devices" / bus_key(gpu.bus_id)
            folder.mkdir(parents=True, exist_ok=True)
            if gpu.numa_node is not None:
                (folder / "numa_node").write_text(f"{gpu.numa_node}\n")
            if gpu.pci_class is not None:
                (folder / "class").write_text(f"0x{gpu.pci_class:06x}\n")
            if gpu.pci_config is not None:
                (folder / "config").write_bytes(gpu.pci_config)
        if any(g.mig_enabled for g in self.gpus):
            path = root / mig.MIG_MINORS_PATH.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(mig_minors_text(g.minor for g in self.gpus))

    # --- internals -------------------------------------------------------------------------------

    def _enter(self, call: str, gpu: FakeGpu | None = None, *args: object) -> None:
        """Log the call, block while it is hung, then answer an injected failure or a lost GPU."""
        self.calls.append(FakeCall(call, None if gpu is None else gpu.uuid, args))
        self._block_if_hung(call, None if gpu is None else gpu.uuid)
        for key in ((call, None if gpu is None else gpu.uuid), (call, None)):
            if key in self.failures:
                raise NVMLError(self.failures[key])
        if gpu is not None and gpu.lost:
            raise NVMLError(self.NVML_ERROR_GPU_IS_LOST)

    def _check_init(self) -> None:
        if self.initialised <= 0:
            raise NVMLError(self.NVML_ERROR_UNINITIALIZED)

    @staticmethod
    def _gpu_of(handle: object) -> FakeGpu:
        if isinstance(handle, FakeGpu):
            return handle
        if isinstance(handle, MigHandle | GpuInstanceHandle):
            return handle.gpu
        raise NVMLError(FakeNvml.NVML_ERROR_INVALID_ARGUMENT)

    def _mig(self, handle: object) -> FakeMigDevice:
        if not isinstance(handle, MigHandle):
            raise NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        device = handle.gpu.mig_devices.get(handle.slot)
        if device is None:
            raise NVMLError(self.NVML_ERROR_NOT_FOUND)  # destroyed since the handle was taken
        return device

    @staticmethod
    def _supported(value: int | None) -> int:
        if value is None:
            raise NVMLError(FakeNvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    # --- library and system ----------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self._check_init()
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        self._check_init()
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._enter("nvmlSystemGetCudaDriverVersion")
        self._check_init()
        return self.cuda_driver_version

    # --- GPUs ------------------------------------------------------------------------------------

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        self._check_init()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        gpu = self.gpus[index] if 0 <= index < len(self.gpus) else None
        self._enter("nvmlDeviceGetHandleByIndex", gpu, index)
        self._check_init()
        if gpu is None:
            raise NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        return gpu

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGpu:
        gpu = next((g for g in self.gpus if g.uuid == uuid), None)
        self.calls.append(FakeCall("nvmlDeviceGetHandleByUUID", uuid))
        self._block_if_hung("nvmlDeviceGetHandleByUUID", uuid)
        for key in (("nvmlDeviceGetHandleByUUID", uuid), ("nvmlDeviceGetHandleByUUID", None)):
            if key in self.failures:
                raise NVMLError(self.failures[key])
        self._check_init()
        if gpu is None:
            raise NVMLError(self.NVML_ERROR_NOT_FOUND)
        if gpu.lost:
            raise NVMLError(self.NVML_ERROR_GPU_IS_LOST)
        return gpu

    def nvmlDeviceGetUUID(self, handle: object) -> str:
        if isinstance(handle, UnknownHandle):
            self._enter("nvmlDeviceGetUUID", None, handle.label)
            raise NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        self._enter("nvmlDeviceGetUUID", self._gpu_of(handle))
        return self._mig(handle).uuid if isinstance(handle, MigHandle) else self._gpu_of(handle).uuid

    def nvmlDeviceGetPciInfo(self, handle: object) -> PciInfo:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetPciInfo", gpu)
        return PciInfo(busId=gpu.bus_id, busIdLegacy=gpu.bus_id[4:])

    def nvmlDeviceGetName(self, handle: object) -> str:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetName", gpu)
        return gpu.name

    def nvmlDeviceGetMinorNumber(self, handle: object) -> int:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetMinorNumber", gpu)
        return gpu.minor

    def nvmlDeviceGetCudaComputeCapability(self, handle: object) -> tuple[int, int]:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetCudaComputeCapability", gpu)
        return gpu.compute_capability

    def nvmlDeviceGetMemoryInfo(self, handle: object, version: int | None = None) -> MemoryInfo | MemoryInfoV2:
        """v1 (no version): `used` includes what the driver reserves, as on real GPUs; v2
        (`version=nvmlMemory_v2`) reports `reserved` apart."""
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetMemoryInfo", gpu, version)
        used = gpu.memory_used_bytes
        if version is None:
            used_v1 = used + gpu.memory_reserved_bytes
            return MemoryInfo(total=gpu.memory_bytes, free=gpu.memory_bytes - used_v1, used=used_v1)
        if version != self.nvmlMemory_v2:
            raise NVMLError(self.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        return MemoryInfoV2(version=version, total=gpu.memory_bytes, reserved=gpu.memory_reserved_bytes,
                            free=gpu.memory_bytes - gpu.memory_reserved_bytes - used, used=used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list[ProcessInfo]:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetComputeRunningProcesses", gpu)
        return [ProcessInfo(pid=p.pid, usedGpuMemory=p.used_memory_bytes) for p in gpu.processes]

    def nvmlDeviceGetFieldValues(self, handle: object, field_ids: Sequence[int]) -> list[FieldValue]:
        """Only NVML_FI_DEV_GET_GPU_RECOVERY_ACTION is known; other fields (and that one on a GPU
        whose `recovery_action` is None) answer NOT_SUPPORTED in their own `nvmlReturn`."""
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetFieldValues", gpu, tuple(field_ids))
        values = []
        for field_id in field_ids:
            known = field_id == self.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION and gpu.recovery_action is not None
            values.append(FieldValue(
                fieldId=field_id, scopeId=0, timestamp=0, latencyUsec=0, valueType=self.NVML_VALUE_TYPE_UNSIGNED_INT,
                nvmlReturn=self.NVML_SUCCESS if known else self.NVML_ERROR_NOT_SUPPORTED,
                value=FieldValueData(uiVal=gpu.recovery_action or 0),
            ))
        return values

    def nvmlDeviceGetMigMode(self, handle: object) -> tuple[int, int]:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetMigMode", gpu)
        if not gpu.mig_supported:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        mode = self.NVML_DEVICE_MIG_ENABLE if gpu.mig_enabled else self.NVML_DEVICE_MIG_DISABLE
        return (mode, mode)

    def _fabric_info(self, call: str, handle: object, info: object) -> int:
        gpu = self._gpu_of(handle)
        self._enter(call, gpu)
        if gpu.fabric is None:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        if not isinstance(info, GpuFabricInfo):
            raise NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        info.clusterUuid = gpu.fabric.cluster_uuid
        info.cliqueId = gpu.fabric.clique_id
        info.state = gpu.fabric.state
        info.status = gpu.fabric.status
        return self.NVML_SUCCESS

    def nvmlDeviceGetGpuFabricInfoV(self, handle: object, info: object) -> int:
        return self._fabric_info("nvmlDeviceGetGpuFabricInfoV", handle, info)

    def nvmlDeviceGetGpuFabricInfo(self, handle: object, info: object) -> int:
        return self._fabric_info("nvmlDeviceGetGpuFabricInfo", handle, info)

    def nvmlDeviceGetTopologyCommonAncestor(self, a: object, b: object) -> int:
        gpu_a, gpu_b = self._gpu_of(a), self._gpu_of(b)
        self._enter("nvmlDeviceGetTopologyCommonAncestor", gpu_a, gpu_b.uuid)
        if ("nvmlDeviceGetTopologyCommonAncestor", gpu_b.uuid) in self.failures:  # a failure for either GPU
            raise NVMLError(self.failures[("nvmlDeviceGetTopologyCommonAncestor", gpu_b.uuid)])
        return self.pcie_levels.get(frozenset((gpu_a.uuid, gpu_b.uuid)), self.default_pcie_level)

    def _link(self, call: str, handle: object, link: int) -> FakeNvLink:
        gpu = self._gpu_of(handle)
        self._enter(call, gpu, link)
        if not gpu.nvlinks:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= link < len(gpu.nvlinks):
            raise NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.nvlinks[link]

    def nvmlDeviceGetNvLinkState(self, handle: object, link: int) -> int:
        active = self._link("nvmlDeviceGetNvLinkState", handle, link).active
        return self.NVML_FEATURE_ENABLED if active else self.NVML_FEATURE_DISABLED

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: object, link: int) -> PciInfo:
        bus_id = self._link("nvmlDeviceGetNvLinkRemotePciInfo", handle, link).remote_bus_id
        return PciInfo(busId=bus_id, busIdLegacy=bus_id[4:])

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: object, link: int) -> int:
        return self._link("nvmlDeviceGetNvLinkRemoteDeviceType", handle, link).remote_type

    # --- MIG (read-only queries) -----------------------------------------------------------------

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: object) -> int:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetMaxMigDeviceCount", gpu)
        return gpu.max_mig_devices if gpu.mig_supported else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: object, slot: int) -> MigHandle:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetMigDeviceHandleByIndex", gpu, slot)
        if not gpu.mig_enabled:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= slot < gpu.max_mig_devices:
            raise NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        if slot not in gpu.mig_devices:
            raise NVMLError(self.NVML_ERROR_NOT_FOUND)
        return MigHandle(gpu, slot)

    def nvmlDeviceGetGpuInstanceId(self, handle: object) -> int:
        self._enter("nvmlDeviceGetGpuInstanceId", self._gpu_of(handle))
        return self._mig(handle).gi_id

    def nvmlDeviceGetComputeInstanceId(self, handle: object) -> int:
        self._enter("nvmlDeviceGetComputeInstanceId", self._gpu_of(handle))
        return self._mig(handle).ci_id

    def nvmlDeviceGetAttributes(self, handle: object) -> DeviceAttributes:
        self._enter("nvmlDeviceGetAttributes", self._gpu_of(handle))
        m = self._mig(handle)
        return DeviceAttributes(
            multiprocessorCount=m.multiprocessors, sharedCopyEngineCount=m.copy_engines,
            sharedDecoderCount=m.decoders, sharedEncoderCount=m.encoders, sharedJpegCount=m.jpegs,
            sharedOfaCount=m.ofas, gpuInstanceSliceCount=m.gi_slices, computeInstanceSliceCount=m.ci_slices,
            memorySizeMB=m.memory_mb,
        )

    def nvmlDeviceGetGpuInstanceById(self, handle: object, gi_id: int) -> GpuInstanceHandle:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetGpuInstanceById", gpu, gi_id)
        if not any(m.gi_id == gi_id for m in gpu.mig_devices.values()):
            raise NVMLError(self.NVML_ERROR_NOT_FOUND)
        return GpuInstanceHandle(gpu, gi_id)

    def nvmlGpuInstanceGetInfo(self, instance: object) -> GpuInstanceInfo:
        if not isinstance(instance, GpuInstanceHandle):
            raise NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        self._enter("nvmlGpuInstanceGetInfo", instance.gpu, instance.gi_id)
        device = next((m for m in instance.gpu.mig_devices.values() if m.gi_id == instance.gi_id), None)
        if device is None:
            raise NVMLError(self.NVML_ERROR_NOT_FOUND)
        return GpuInstanceInfo(id=instance.gi_id, profileId=device.profile_id)

    def nvmlDeviceGetGpuInstanceProfileInfo(self, handle: object, profile: int,
                                            version: int = 2) -> GpuInstanceProfileInfo:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetGpuInstanceProfileInfo", gpu, profile, version)
        if version not in (1, 2) or (version == 2 and not self.profile_info_v2):
            raise NVMLError(self.NVML_ERROR_FUNCTION_NOT_FOUND)
        if not 0 <= profile < self.NVML_GPU_INSTANCE_PROFILE_COUNT:
            raise NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        found = next((p for p in gpu.gi_profiles if p.index == profile), None) if gpu.mig_supported else None
        if found is None:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return GpuInstanceProfileInfo(
            id=found.id, sliceCount=found.slices, instanceCount=found.instances,
            multiprocessorCount=found.multiprocessors, copyEngineCount=found.copy_engines,
            decoderCount=found.decoders, encoderCount=found.encoders, jpegCount=found.jpegs,
            ofaCount=found.ofas, memorySizeMB=found.memory_mb, version=version,
        )

    # --- events ----------------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._enter("nvmlEventSetCreate")
        self._check_init()
        event_set = FakeEventSet()
        self.event_sets.append(event_set)
        return event_set

    def _event_set(self, event_set: object) -> FakeEventSet:
        if not isinstance(event_set, FakeEventSet) or event_set.freed or event_set not in self.event_sets:
            raise NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        return event_set

    def nvmlDeviceGetSupportedEventTypes(self, handle: object) -> int:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetSupportedEventTypes", gpu)
        return gpu.supported_events

    def nvmlDeviceRegisterEvents(self, handle: object, mask: int, event_set: object) -> None:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceRegisterEvents", gpu, mask)
        self._event_set(event_set).registered.append((gpu.uuid, mask))

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> EventData:
        """The next queued event (or return code); with none queued, waits up to `timeout_ms`
        for one to be posted, then answers TIMEOUT as NVML does. The queue is handed out as
        given, not filtered by what was registered, so a test can give the waiter anything."""
        self._enter("nvmlEventSetWait_v2", None, timeout_ms)
        self._event_set(event_set)
        self.wait_timeouts.append(timeout_ms)
        with self._events_changed:
            self._events_changed.wait_for(lambda: bool(self._events), timeout=timeout_ms / 1000)
            item = self._events.popleft() if self._events else self.NVML_ERROR_TIMEOUT
        if isinstance(item, int):
            raise NVMLError(item)
        try:
            device: object = self.gpu(item.gpu)
        except KeyError:
            device = UnknownHandle(str(item.gpu))
        return EventData(device=device, eventType=item.event_type, eventData=item.data,
                         gpuInstanceId=item.gpu_instance, computeInstanceId=item.compute_instance)

    def nvmlEventSetFree(self, event_set: object) -> None:
        self._enter("nvmlEventSetFree")
        self._event_set(event_set).freed = True

    # --- probe counters --------------------------------------------------------------------------

    def nvmlDeviceGetTotalEccErrors(self, handle: object, error_type: int, counter_type: int) -> int:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetTotalEccErrors", gpu, error_type, counter_type)
        if (error_type, counter_type) != (self.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, self.NVML_VOLATILE_ECC):
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)  # the fake keeps only this counter
        return self._supported(gpu.volatile_uncorrected)

    def nvmlDeviceGetRemappedRows(self, handle: object) -> tuple[int, int, int, int]:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetRemappedRows", gpu)
        if gpu.remapped_rows is None:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return gpu.remapped_rows

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: object) -> int:
        gpu = self._gpu_of(handle)
        self._enter("nvmlDeviceGetRetiredPagesPendingStatus", gpu)
        return self._supported(gpu.retired_pending)


def mig_minors_text(gpu_minors: Iterable[int], gis: int = 15, cis: int = 8) -> str:
    """/proc/driver/nvidia-caps/mig-minors as the driver writes it for these GPU minors."""
    lines = ["config 1", "monitor 2"]
    per_gpu = gis * (1 + cis)
    for minor in gpu_minors:
        for gi in range(gis):
            base = 3 + minor * per_gpu + gi * (1 + cis)
            lines.append(f"gpu{minor}/gi{gi}/access {base}")
            lines.extend(f"gpu{minor}/gi{gi}/ci{ci}/access {base + 1 + ci}" for ci in range(cis))
    return "\n".join(lines) + "\n"


# --- a ready-made node -------------------------------------------------------------------------

# Per-GPU facts of the real H200 in the nvidia-h200 fixture (NVML on driver 580.159.04): its UUID
# (GPU 0 here), name, memory (644939776 bytes "used" in the v1 memory info on the idle GPU: the
# driver's reserve; nvidia-smi shows 616 MiB reserved, 0 MiB used), compute capability, MIG
# profiles (nvdp.core.migprofiles.H200), supported event types, ECC counters at 0, remapped rows
# all 0, retired pages not supported, GPU recovery action "None", no processes, CUDA driver
# version 13000. That node was a single PCIe GPU in a VM; the board around the GPUs
# below (bus IDs, the other UUIDs, two NUMA nodes, 18 NVLinks each to the NVSwitches) is made up
# to look like an 8-GPU HGX H200 baseboard and is not from a fixture.
H200_FIXTURE_UUID = "GPU-561c5ac8-2525-530f-236a-f8e1e82e0c3b"
HGX_BUS_IDS = ("18", "2A", "3A", "5D", "9A", "AB", "BA", "DB")
NVSWITCH_BUS_IDS = ("00000000:05:00.0", "00000000:06:00.0", "00000000:07:00.0", "00000000:08:00.0")
H200_NVLINKS = 18
H200_RESERVED_BYTES = 644939776  # v1 `used` of the idle fixture GPU


def h200_gpu(index: int, nvlinks: bool = True) -> FakeGpu:
    """GPU `index` of the 8 x H200 node (see `h200_node`)."""
    uuid = H200_FIXTURE_UUID if index == 0 else f"GPU-561c5ac8-2525-530f-236a-f8e1e82e0c{0x3b + index:02x}"
    links = tuple(FakeNvLink(NVSWITCH_BUS_IDS[link % len(NVSWITCH_BUS_IDS)]) for link in range(H200_NVLINKS))
    return FakeGpu(
        uuid=uuid,
        minor=index,
        bus_id=f"00000000:{HGX_BUS_IDS[index % len(HGX_BUS_IDS)]}:00.0",
        numa_node=0 if index < 4 else 1,
        nvlinks=links if nvlinks else (),
        retired_pending=None,  # "Pending Page Blacklist: N/A" on the fixture's H200
        recovery_action=FakeNvml.NVML_GPU_RECOVERY_ACTION_NONE,  # "GPU Recovery Action: None"
        memory_reserved_bytes=H200_RESERVED_BYTES,
    )


def h200_node(gpus: int = 8, mig_layout: Mapping[int, Sequence[str]] | None = None) -> FakeNvml:
    """An HGX H200 node: `gpus` (at most 8) x NVIDIA H200 SXM, all joined through NVSwitch (18
    NVLinks each), GPUs 0-3 on NUMA node 0 and 4-7 on node 1 (PCIe: NODE within a NUMA node,
    SYSTEM across), MIG disabled except on the GPUs `mig_layout` gives GPU-instance profile
    names for ({0: ["3g.71gb", "2g.35gb", "1g.18gb+me", "1g.18gb"]}: one MIG device per profile,
    in NVML slots 0.., GPU instances 1.., each with one compute instance over all its slices)."""
    if not 1 <= gpus <= len(HGX_BUS_IDS):
        raise ValueError(f"an HGX H200 board has 1 to {len(HGX_BUS_IDS)} GPUs, not {gpus}")
    node = [h200_gpu(i) for i in range(gpus)]
    for index, names in (mig_layout or {}).items():
        gpu = node[index]
        gpu.mig_enabled = True
        for slot, name in enumerate(names):
            profile = H200.profile(name)
            if profile is None:
                raise ValueError(f"no H200 GPU-instance profile {name!r}")
            uuid = f"MIG-{gpu.uuid.removeprefix('GPU-')[:-4]}{index:02x}{slot:02x}"
            gpu.mig_devices[slot] = FakeMigDevice.of_profile(uuid, profile, gi_id=slot + 1)
    levels = {
        frozenset((a.uuid, b.uuid)): FakeNvml.NVML_TOPOLOGY_NODE if a.numa_node == b.numa_node
        else FakeNvml.NVML_TOPOLOGY_SYSTEM
        for i, a in enumerate(node) for b in node[i + 1 :]
    }
    return FakeNvml(node, pcie_levels=levels)
