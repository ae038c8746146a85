"""The NVML backend: real GPUs through nvidia-ml-py. The only module that imports pynvml.

`pynvml` is imported lazily, so importing nvdp never needs a driver. Every NVML call goes through
`map_nvml_errors`, which turns NVMLError into nvdp's own errors where they enter.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from nvdp.core import mig
from nvdp.core.devices import GpuInfo, MigInfo, Node, PcieLevel, Topology
from nvdp.core.health import EventKind, HealthEvent, ProbeSample
from nvdp.core.topology import Far, NvLinkEnd, build_topology, bus_key
from nvdp.errors import DeviceError, DiscoveryError, EventWaitError, NvmlUnavailable

log = logging.getLogger("nvdp.nvml")  # stable name: operators filter on it

LIBRARY = "libnvidia-ml.so.1"
# Where the official plugin looks for the library under a non-root driver root, in this order.
LIBRARY_DIRS = (
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
)
NVLINK_MAX_LINKS = 18  # link indices probed per GPU when the bindings do not say (NVML_NVLINK_MAX_LINKS)
SKIPPED_NAMES = ("DGX Display", "NVIDIA DGX Display")


def library_candidates(driver_root: str) -> tuple[str, ...]:
    """The library paths tried for a driver root, the plain soname last (as the official plugin)."""
    if driver_root in ("", "/"):
        return (LIBRARY,)
    return (*(os.path.join(driver_root, d, LIBRARY) for d in LIBRARY_DIRS), LIBRARY)


def mig_minors_candidates(driver_root: str) -> tuple[str, ...]:
    """Where mig-minors is looked for: under the driver root first, then our own /proc (where the
    official plugin reads it; /proc/driver is the host's in any container)."""
    own = mig.MIG_MINORS_PATH
    if driver_root in ("", "/"):
        return (own,)
    return (os.path.join(driver_root, own.lstrip("/")), own)


def read_mig_minors(candidates: tuple[str, ...]) -> dict[str, int]:
    """The first mig-minors file that exists, parsed; none at all gives an empty map (as upstream:
    MIG devices then lack their capability nodes)."""
    for path in candidates:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DiscoveryError(f"cannot read {path}: {exc.strerror or exc}") from exc
        minors, bad = mig.parse_mig_minors(text)
        for line in bad:
            log.warning("skipping unparsable line in the MIG minors file", extra={"path": path, "line": line})
        return minors
    log.warning("no MIG minors file found; MIG devices get no capability device nodes",
                extra={"searched": ",".join(candidates)})
    return {}


def read_numa_node(bus_id: str, sysfs_root: str = "/sys") -> int | None:
    """NUMA node from sysfs; None when unreadable or negative. Garbage is an error (as upstream)."""
    path = Path(sysfs_root, "bus/pci/devices", bus_key(bus_id), "numa_node")
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        node = int(text)
    except ValueError:
        raise DiscoveryError(f"{path}: numa_node is not an integer: {text!r}") from None
    return node if node >= 0 else None


@contextlib.contextmanager
def map_nvml_errors(what: str, gpu: str | None = None) -> Iterator[None]:
    import pynvml

    try:
        yield
    except pynvml.NVMLError as exc:
        if gpu is not None:
            raise DeviceError(gpu, f"{what}: {exc}") from exc
        raise DiscoveryError(f"{what}: {exc}") from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlBackend:
    """Discovery on real GPUs.

    Resource handling: NVML is initialised once in the constructor and shut down by `close()`.
    Error handling: a library that cannot be loaded raises `NvmlUnavailable` listing the paths
    tried; a failing NVML call during discovery raises `DiscoveryError` naming the call.
    """

    name = "nvml"

    def __init__(
        self,
        driver_root: str = "/",
        sysfs_root: str = "/sys",
        nvml: Any = None,  # the pynvml module; tests pass a fake with the same functions
    ) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        self._nvml = nvml
        self._sysfs_root = sysfs_root
        self._mig_minors_paths = mig_minors_candidates(driver_root)
        self.library = self._load(driver_root)

    def _load(self, driver_root: str) -> str:
        candidates = library_candidates(driver_root)
        chosen = next((c for c in candidates[:-1] if os.path.exists(c)), candidates[-1])
        try:
            if self._nvml.nvmlLib is None:
                # pynvml loads the plain soname unless its library handle is already set.
                self._nvml.nvmlLib = ctypes.CDLL(chosen)
            self._nvml.nvmlInit()
        except (OSError, self._nvml.NVMLError) as exc:
            raise NvmlUnavailable(f"could not load or initialise NVML ({exc})", candidates) from exc
        log.info("NVML initialised", extra={"library": chosen})
        return chosen

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()

    def discover(self) -> Node:
        nv = self._nvml
        with map_nvml_errors("nvmlDeviceGetCount"):
            count = nv.nvmlDeviceGetCount()
        gpus: list[GpuInfo] = []
        handles: dict[str, Any] = {}
        for i in range(count):
            try:
                with map_nvml_errors("nvmlDeviceGetHandleByIndex", gpu=str(i)):
                    handle = nv.nvmlDeviceGetHandleByIndex(i)
                gpu = self._gpu(i, handle)
            except DeviceError as exc:
                # One broken GPU (e.g. fallen off the bus before we started) must not keep the
                # others from being served; with none left, start-up reports no devices.
                log.error("GPU skipped: NVML cannot describe it", extra={"gpu": i, "error": str(exc)})
                continue
            if gpu.name in SKIPPED_NAMES:
                continue
            gpus.append(gpu)
            handles[gpu.uuid] = handle
        with map_nvml_errors("nvmlSystemGetDriverVersion"):
            driver = _text(nv.nvmlSystemGetDriverVersion())
        cuda = 0
        with contextlib.suppress(nv.NVMLError):
            cuda = int(nv.nvmlSystemGetCudaDriverVersion())
        return Node(
            gpus=tuple(gpus),
            topology=self._topology(gpus, handles),
            driver_version=driver,
            cuda_driver_version=cuda,
            control_devices=self._control_devices(),
            mig_minors=read_mig_minors(self._mig_minors_paths) if any(g.mig_enabled for g in gpus) else {},
        )

    def _gpu(self, index: int, handle: Any) -> GpuInfo:
        nv = self._nvml
        gpu = str(index)
        with map_nvml_errors("reading GPU facts", gpu=gpu):
            uuid = _text(nv.nvmlDeviceGetUUID(handle))
            bus_id = _text(nv.nvmlDeviceGetPciInfo(handle).busId)
            name = _text(nv.nvmlDeviceGetName(handle))
            minor = int(nv.nvmlDeviceGetMinorNumber(handle))
            major_cc, minor_cc = nv.nvmlDeviceGetCudaComputeCapability(handle)
        memory = 0
        with contextlib.suppress(nv.NVMLError):  # as upstream: a memory error gives 0
            memory = int(nv.nvmlDeviceGetMemoryInfo(handle).total)
        mig_enabled = False
        with contextlib.suppress(nv.NVMLError):  # NOT_SUPPORTED on GPUs without MIG
            current, _pending = nv.nvmlDeviceGetMigMode(handle)
            mig_enabled = current == nv.NVML_DEVICE_MIG_ENABLE
        return GpuInfo(
            index=index,
            uuid=uuid,
            minor=minor,
            name=name,
            pci_bus_id=bus_id,
            memory_bytes=memory,
            compute_capability=f"{major_cc}.{minor_cc}",
            numa_node=read_numa_node(bus_id, self._sysfs_root),
            mig_enabled=mig_enabled,
            mig_devices=self._mig_devices(gpu, handle) if mig_enabled else (),
        )

    def _mig_devices(self, gpu: str, handle: Any) -> tuple[MigInfo, ...]:
        """Every MIG device of a MIG-enabled GPU. Read-only: only queries, never a MIG setting."""
        nv = self._nvml
        with map_nvml_errors(f"GPU {gpu}: nvmlDeviceGetMaxMigDeviceCount"):
            slots = int(nv.nvmlDeviceGetMaxMigDeviceCount(handle))
        profile_indexes: dict[int, int] | None = None
        found: list[MigInfo] = []
        for slot in range(slots):
            try:
                mig_handle = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nv.NVMLError as exc:
                if exc.value in (nv.NVML_ERROR_NOT_FOUND, nv.NVML_ERROR_INVALID_ARGUMENT):
                    continue  # an empty slot: j is NVML's slot index, not a dense counter
                raise DiscoveryError(f"GPU {gpu}: nvmlDeviceGetMigDeviceHandleByIndex({slot}): {exc}") from exc
            with map_nvml_errors(f"GPU {gpu}: reading MIG device {slot}"):
                uuid = _text(nv.nvmlDeviceGetUUID(mig_handle))
                gi_id = int(nv.nvmlDeviceGetGpuInstanceId(mig_handle))
                ci_id = int(nv.nvmlDeviceGetComputeInstanceId(mig_handle))
                attrs = nv.nvmlDeviceGetAttributes(mig_handle)
            # The media-extension and graphics variants are only visible in the GPU instance's
            # profile: find the profile index whose ID the instance was created from.
            hint = " (the plugin needs NVIDIA_MIG_MONITOR_DEVICES=all or root to read MIG instances)"
            with map_nvml_errors(f"GPU {gpu}: reading GPU instance {gi_id} of MIG device {slot}{hint}"):
                profile_id = int(nv.nvmlGpuInstanceGetInfo(nv.nvmlDeviceGetGpuInstanceById(handle, gi_id)).profileId)
            if profile_indexes is None:
                profile_indexes = self._gi_profile_indexes(gpu, handle)
            index = profile_indexes.get(profile_id)
            if index is None or index not in mig.GI_PROFILE_INDEXES:
                raise DiscoveryError(f"GPU {gpu}: MIG device {slot} uses GPU instance profile {profile_id}, "
                                     "which matches no known profile index")
            _slices, attributes, neg_attributes = mig.GI_PROFILE_INDEXES[index]
            found.append(
                MigInfo(
                    slot=slot,
                    uuid=uuid,
                    gi_id=gi_id,
                    ci_id=ci_id,
                    gi_slices=int(attrs.gpuInstanceSliceCount),
                    ci_slices=int(attrs.computeInstanceSliceCount),
                    memory_mb=int(attrs.memorySizeMB),
                    attributes=attributes,
                    neg_attributes=neg_attributes,
                    multiprocessors=int(attrs.multiprocessorCount),
                    copy_engines=int(attrs.sharedCopyEngineCount),
                    decoders=int(attrs.sharedDecoderCount),
                    encoders=int(attrs.sharedEncoderCount),
                    jpegs=int(attrs.sharedJpegCount),
                    ofas=int(attrs.sharedOfaCount),
                )
            )
        return tuple(found)

    def _gi_profile_indexes(self, gpu: str, handle: Any) -> dict[int, int]:
        """GPU-instance profile ID -> NVML profile index, for the profiles this GPU supports."""
        nv = self._nvml
        indexes: dict[int, int] = {}
        for index in range(nv.NVML_GPU_INSTANCE_PROFILE_COUNT):
            try:
                info = self._gi_profile_info(handle, index)
            except nv.NVMLError as exc:
                if exc.value in (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_INVALID_ARGUMENT):
                    continue  # a profile this GPU does not have
                raise DiscoveryError(f"GPU {gpu}: nvmlDeviceGetGpuInstanceProfileInfo({index}): {exc}") from exc
            indexes.setdefault(int(info.id), index)
        return indexes

    def _gi_profile_info(self, handle: Any, index: int) -> Any:
        nv = self._nvml
        try:
            return nv.nvmlDeviceGetGpuInstanceProfileInfo(handle, index)
        except nv.NVMLError as exc:
            if exc.value != nv.NVML_ERROR_FUNCTION_NOT_FOUND:
                raise
        return nv.nvmlDeviceGetGpuInstanceProfileInfo(handle, index, version=1)  # drivers before the V call

    def _topology(self, gpus: list[GpuInfo], handles: dict[str, Any]) -> Topology:
        """The NVLink ends of every GPU and the PCIe level of every pair, read once at discovery;
        topology.build_topology says what they mean."""
        nv = self._nvml
        links = {g.uuid: self._nvlink_ends(handles[g.uuid]) for g in gpus}
        pcie: dict[frozenset[str], PcieLevel] = {}
        for i, a in enumerate(gpus):
            for b in gpus[i + 1 :]:
                with contextlib.suppress(nv.NVMLError, ValueError):
                    level = nv.nvmlDeviceGetTopologyCommonAncestor(handles[a.uuid], handles[b.uuid])
                    pcie[frozenset((a.uuid, b.uuid))] = PcieLevel(int(level))
        return build_topology(gpus, links, pcie)

    def _nvlink_ends(self, handle: Any) -> list[NvLinkEnd]:
        nv = self._nvml
        far_kinds = {
            getattr(nv, "NVML_NVLINK_DEVICE_TYPE_GPU", 0): Far.GPU,
            getattr(nv, "NVML_NVLINK_DEVICE_TYPE_IBMNPU", 1): Far.OTHER,
            getattr(nv, "NVML_NVLINK_DEVICE_TYPE_SWITCH", 2): Far.SWITCH,
        }
        ends = []
        for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", NVLINK_MAX_LINKS)):
            try:
                if nv.nvmlDeviceGetNvLinkState(handle, link) != nv.NVML_FEATURE_ENABLED:
                    continue
                remote = _text(nv.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)
            except nv.NVMLError:
                continue  # NOT_SUPPORTED on PCIe-only GPUs, or a link index past the last
            far = Far.UNKNOWN
            with contextlib.suppress(nv.NVMLError, AttributeError):  # older drivers / bindings
                far = far_kinds.get(int(nv.nvmlDeviceGetNvLinkRemoteDeviceType(handle, link)), Far.UNKNOWN)
            ends.append(NvLinkEnd(remote, far))
        return ends

    def _control_devices(self) -> tuple[str, ...]:
        # As the official plugin: a control node is passed only if it exists in our own container.
        return tuple(p for p in CONTROL_DEVICES if os.path.exists(p))

    # --- health source ---------------------------------------------------------------------

    def watch_events(self, node: Node) -> NvmlEventWaiter:
        return NvmlEventWaiter(self._nvml, node.gpus)

    def probe(self, gpus: Sequence[str]) -> Mapping[str, ProbeSample]:
        return {uuid: probe_gpu(self._nvml, uuid) for uuid in gpus}


# ---------------------------------------------------------------------------------------------
# Health: the event set and the probe. `nv` is the pynvml module (or a fake of the few calls
# used here, in tests); every NVML error is handled where it is raised.

NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId / computeInstanceId of an event that names none


def event_mask(nv: Any) -> int:
    """What we register: XID critical errors and ECC error events (single and double bit)."""
    return int(nv.nvmlEventTypeXidCriticalError | nv.nvmlEventTypeDoubleBitEccError | nv.nvmlEventTypeSingleBitEccError)


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

    def __init__(self, nv: Any, gpus: Sequence[GpuInfo]) -> None:
        self._nv = nv
        self.failures: dict[str, str] = {}
        self._gpus: dict[int, str] = {}
        self._set: Any = None
        self._set_error = ""
        try:
            self._set = nv.nvmlEventSetCreate()
        except nv.NVMLError as exc:
            self._set_error = f"nvmlEventSetCreate: {exc}"
            log.error("cannot create an NVML event set", extra={"error": str(exc)})
            return
        wanted = event_mask(nv)
        for gpu in gpus:
            self._register(gpu, wanted)

    def _register(self, gpu: GpuInfo, wanted: int) -> None:
        nv = self._nv
        step = "nvmlDeviceGetHandleByUUID"
        try:
            handle = nv.nvmlDeviceGetHandleByUUID(gpu.uuid)
            step = "nvmlDeviceGetSupportedEventTypes"
            mask = wanted & int(nv.nvmlDeviceGetSupportedEventTypes(handle))
            step = "nvmlDeviceRegisterEvents"
            if mask:
                nv.nvmlDeviceRegisterEvents(handle, mask, self._set)
        except nv.NVMLError as exc:
            if exc.value == nv.NVML_ERROR_NOT_SUPPORTED:
                log.warning("GPU too old to support health events; XIDs will not be seen",
                            extra={"device": gpu.uuid, "error": f"{step}: {exc}"})
                return
            self.failures[gpu.uuid] = f"{step}: {exc}"
            log.error("cannot register health events", extra={"device": gpu.uuid, "error": f"{step}: {exc}"})
            return
        if not mask:
            log.warning("GPU supports none of the health events we watch", extra={"device": gpu.uuid})
            return
        self._gpus[_handle_key(handle)] = gpu.uuid
        log.info("health events registered", extra={"device": gpu.uuid, "mask": hex(mask)})

    def wait(self, timeout_s: float) -> HealthEvent | None:
        nv = self._nv
        if self._set is None:
            raise EventWaitError(self._set_error)
        try:
            data = nv.nvmlEventSetWait_v2(self._set, max(1, int(timeout_s * 1000)))
        except nv.NVMLError as exc:
            if exc.value == nv.NVML_ERROR_TIMEOUT:
                return None  # the normal outcome of a quiet wait
            raise EventWaitError(f"nvmlEventSetWait: {exc}") from exc
        return self._event(data)

    def _event(self, data: Any) -> HealthEvent | None:
        nv = self._nv
        kind_of: list[tuple[int, EventKind]] = [
            (nv.nvmlEventTypeXidCriticalError, EventKind.XID),
            (nv.nvmlEventTypeDoubleBitEccError, EventKind.ECC_UNCORRECTED),
            (nv.nvmlEventTypeSingleBitEccError, EventKind.ECC_CORRECTED),
        ]
        kind = next((k for bit, k in kind_of if int(data.eventType) & bit), None)
        if kind is None:
            log.debug("NVML event of a type we do not watch", extra={"type": hex(int(data.eventType))})
            return None
        uuid = self._gpus.get(_handle_key(data.device))
        if uuid is None:
            try:
                uuid = _text(nv.nvmlDeviceGetUUID(data.device))
            except nv.NVMLError:
                uuid = ""  # reported as an event for an unknown GPU
        gi, ci = int(data.gpuInstanceId), int(data.computeInstanceId)
        return HealthEvent(
            gpu=uuid,
            kind=kind,
            xid=int(data.eventData) if kind is EventKind.XID else None,
            gi=None if gi == NO_INSTANCE else gi,
            ci=None if ci == NO_INSTANCE or gi == NO_INSTANCE else ci,
        )

    def interrupt(self) -> None:
        pass  # an NVML wait cannot be interrupted; its timeout bounds how long stopping takes

    def close(self) -> None:
        if self._set is not None:
            with contextlib.suppress(self._nv.NVMLError):
                self._nv.nvmlEventSetFree(self._set)
            self._set = None


class _Lost(Exception):
    pass


def probe_gpu(nv: Any, uuid: str) -> ProbeSample:
    """Does the GPU still answer, and what do its memory-error counters say?

    The GPU is unreachable when its handle or a basic query fails, lost when NVML says
    GPU_IS_LOST (or no longer knows the UUID). Signals a GPU does not support are None.
    """
    gone = (nv.NVML_ERROR_GPU_IS_LOST, nv.NVML_ERROR_NOT_FOUND)
    answered = (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_NO_PERMISSION)  # a clear answer from the driver
    try:
        handle = nv.nvmlDeviceGetHandleByUUID(uuid)
    except nv.NVMLError as exc:
        return ProbeSample(reachable=False, lost=exc.value in gone, error=str(exc))
    try:
        nv.nvmlDeviceGetMemoryInfo(handle)  # a query that reaches the GPU (the handle may be cached)
    except nv.NVMLError as exc:
        if exc.value not in answered:
            return ProbeSample(reachable=False, lost=exc.value in gone, error=str(exc))

    def optional(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except nv.NVMLError as exc:
            if exc.value == nv.NVML_ERROR_GPU_IS_LOST:
                raise _Lost(str(exc)) from exc
            if exc.value not in (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_NO_PERMISSION):
                log.debug("health probe query failed", extra={"device": uuid, "error": str(exc)})
            return None

    try:
        volatile = optional(lambda: nv.nvmlDeviceGetTotalEccErrors(
            handle, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC))
        rows = optional(lambda: nv.nvmlDeviceGetRemappedRows(handle))
        retired = optional(lambda: nv.nvmlDeviceGetRetiredPagesPendingStatus(handle))
    except _Lost as exc:
        return ProbeSample(reachable=False, lost=True, error=str(exc))
    return ProbeSample(
        volatile_uncorrected=None if volatile is None else int(volatile),
        remap_pending=None if rows is None else bool(rows[2]),
        remap_failed=None if rows is None else bool(rows[3]),
        retired_pending=None if retired is None else retired == nv.NVML_FEATURE_ENABLED,
    )


CONTROL_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")


def nvml_loadable() -> bool:
    """Whether NVML loads and initialises on this machine (for tests and diagnostics)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True
