"""The NVML backend: real GPUs through nvidia-ml-py. The only module that imports pynvml.

`pynvml` is imported lazily, so importing nvdp never needs a driver. Every NVML call goes through
`map_nvml_errors`, which turns NVMLError into nvdp's own errors where they enter.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nvdp.devices import GpuInfo, MigInfo, Node, PcieLevel, Topology
from nvdp.errors import DeviceError, DiscoveryError, NvmlUnavailable

log = logging.getLogger(__name__)

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
NVLINK_MAX_LINKS = 18  # links the official allocator inspects per GPU
SKIPPED_NAMES = ("DGX Display", "NVIDIA DGX Display")


def library_candidates(driver_root: str) -> tuple[str, ...]:
    """The library paths tried for a driver root, the plain soname last (as the official plugin)."""
    if driver_root in ("", "/"):
        return (LIBRARY,)
    return (*(os.path.join(driver_root, d, LIBRARY) for d in LIBRARY_DIRS), LIBRARY)


def pci_sysfs_name(bus_id: str) -> str:
    """NVML's "00000000:3B:00.0" -> sysfs "0000:3b:00.0"."""
    bus = bus_id[4:] if len(bus_id) == 16 and bus_id.startswith("0000") else bus_id
    return bus.lower()


def read_numa_node(bus_id: str, sysfs_root: str = "/sys") -> int | None:
    """NUMA node from sysfs; None when unreadable or negative. Garbage is an error (as upstream)."""
    path = Path(sysfs_root, "bus/pci/devices", pci_sysfs_name(bus_id), "numa_node")
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

    def __init__(self, driver_root: str = "/", sysfs_root: str = "/sys", dev_root: str = "/") -> None:
        import pynvml

        self._nvml = pynvml
        self._sysfs_root = sysfs_root
        self._dev_root = dev_root
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
            with map_nvml_errors("nvmlDeviceGetHandleByIndex", gpu=str(i)):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
            gpu = self._gpu(i, handle)
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
        nv = self._nvml
        with map_nvml_errors("nvmlDeviceGetMaxMigDeviceCount", gpu=gpu):
            slots = int(nv.nvmlDeviceGetMaxMigDeviceCount(handle))
        found: list[MigInfo] = []
        for slot in range(slots):
            try:
                mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nv.NVMLError as exc:
                if exc.value in (nv.NVML_ERROR_NOT_FOUND, nv.NVML_ERROR_INVALID_ARGUMENT):
                    continue  # an empty slot: j is NVML's slot index, not a dense counter
                raise DeviceError(gpu, f"nvmlDeviceGetMigDeviceHandleByIndex({slot}): {exc}") from exc
            with map_nvml_errors(f"reading MIG device {slot}", gpu=gpu):
                attrs = nv.nvmlDeviceGetAttributes(mig)
                found.append(
                    MigInfo(
                        slot=slot,
                        uuid=_text(nv.nvmlDeviceGetUUID(mig)),
                        gi_id=int(nv.nvmlDeviceGetGpuInstanceId(mig)),
                        ci_id=int(nv.nvmlDeviceGetComputeInstanceId(mig)),
                        gi_slices=int(attrs.gpuInstanceSliceCount),
                        ci_slices=int(attrs.computeInstanceSliceCount),
                        memory_mb=int(attrs.memorySizeMB),
                    )
                )
        return tuple(found)

    def _topology(self, gpus: list[GpuInfo], handles: dict[str, Any]) -> Topology:
        nv = self._nvml
        by_bus = {pci_sysfs_name(g.pci_bus_id): g.uuid for g in gpus}
        direct: dict[frozenset[str], int] = {}
        switch_links: dict[str, int] = {}
        for gpu in gpus:
            for link in range(NVLINK_MAX_LINKS):
                try:
                    if nv.nvmlDeviceGetNvLinkState(handles[gpu.uuid], link) != nv.NVML_FEATURE_ENABLED:
                        continue
                    remote = _text(nv.nvmlDeviceGetNvLinkRemotePciInfo(handles[gpu.uuid], link).busId)
                except nv.NVMLError:
                    continue  # NOT_SUPPORTED on PCIe-only GPUs, or a link index past the last
                peer = by_bus.get(pci_sysfs_name(remote))
                if peer is None:
                    # The far end is not a GPU: an NVSwitch, which joins every switch-attached GPU.
                    switch_links[gpu.uuid] = switch_links.get(gpu.uuid, 0) + 1
                elif peer != gpu.uuid:
                    key = frozenset((gpu.uuid, peer))
                    direct[key] = direct.get(key, 0) + 1
        nvlinks: dict[frozenset[str], int] = {}
        pcie: dict[frozenset[str], PcieLevel] = {}
        for i, a in enumerate(gpus):
            for b in gpus[i + 1 :]:
                key = frozenset((a.uuid, b.uuid))
                # Each direct link was seen from both ends.
                links = direct.get(key, 0) // 2 + min(switch_links.get(a.uuid, 0), switch_links.get(b.uuid, 0))
                if links:
                    nvlinks[key] = links
                with contextlib.suppress(nv.NVMLError, ValueError):
                    level = nv.nvmlDeviceGetTopologyCommonAncestor(handles[a.uuid], handles[b.uuid])
                    pcie[key] = PcieLevel(int(level))
        return Topology(nvlinks=nvlinks, pcie=pcie)

    def _control_devices(self) -> tuple[str, ...]:
        # As the official plugin: a control node is passed only if it exists in our own container.
        return tuple(p for p in CONTROL_DEVICES if os.path.exists(p))


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
