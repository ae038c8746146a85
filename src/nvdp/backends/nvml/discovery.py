"""The NVML backend: discovery of real GPUs (full GPUs, MIG devices, topology, versions).

Every NVML call goes through the seam (`seam.Nvml`), which turns NVML's failures into nvdp's
errors naming the call; library search is in `library.py`, node files in `sysfs.py` and the
health events and probe in `health.py`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from typing import Any

from nvdp.backends.nvml.health import NvmlEventWaiter, gpu_usage, probe_gpu
from nvdp.backends.nvml.library import open_nvml
from nvdp.backends.nvml.seam import Nvml, text
from nvdp.backends.nvml.sysfs import (
    mig_minors_candidates,
    read_mig_minors,
    read_numa_node,
    read_pci_class,
    read_vgpu,
)
from nvdp.core import mig
from nvdp.core.devices import CONTROL_DEVICES, FabricInfo, GpuInfo, MigInfo, Node, PcieLevel, Topology
from nvdp.core.health import ProbeSample
from nvdp.core.hygiene import GpuUsage
from nvdp.core.topology import Far, NvLinkEnd, build_topology
from nvdp.errors import DeviceError, DiscoveryError

log = logging.getLogger("nvdp.nvml")  # stable name: operators filter on it

NVLINK_MAX_LINKS = 18  # link indices probed per GPU when the bindings do not say (NVML_NVLINK_MAX_LINKS)
SKIPPED_NAMES = ("DGX Display", "NVIDIA DGX Display")
EMPTY_MIG_SLOT = ("NOT_FOUND", "INVALID_ARGUMENT")  # j is NVML's slot index, not a dense counter
PROFILE_ABSENT = ("NOT_SUPPORTED", "INVALID_ARGUMENT")  # a GPU-instance profile this GPU does not have
FABRIC_STATE_COMPLETED = 3  # NVML_GPU_FABRIC_STATE_COMPLETED, for bindings that lack the name
MIG_HINT = " (the plugin needs NVIDIA_MIG_MONITOR_DEVICES=all or root to read MIG instances)"


class NvmlBackend:
    """Discovery on real GPUs.

    `nvml` is the pynvml module, or a fake with the same names (`nvdp.testing.fake_nvml`).
    Resource handling: NVML is initialised once in the constructor and shut down by `close()`.
    Error handling: a library that cannot be loaded raises `NvmlUnavailable` listing the paths
    tried; a failing NVML call during discovery raises `DiscoveryError` naming the call.
    """

    name = "nvml"

    def __init__(self, driver_root: str = "/", sysfs_root: str = "/sys", nvml: Any = None) -> None:
        self._nv = Nvml.real() if nvml is None else Nvml(nvml)
        self._sysfs_root = sysfs_root
        self._mig_minors_paths = mig_minors_candidates(driver_root)
        self.library = open_nvml(self._nv, driver_root)

    def close(self) -> None:
        self._nv.shutdown()

    def discover(self) -> Node:
        nv = self._nv
        count = int(nv.call("nvmlDeviceGetCount"))
        gpus: list[GpuInfo] = []
        handles: dict[str, Any] = {}
        for i in range(count):
            try:
                handle = nv.call("nvmlDeviceGetHandleByIndex", i, gpu=str(i))
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
        driver = text(nv.call("nvmlSystemGetDriverVersion"))
        cuda = nv.try_call("nvmlSystemGetCudaDriverVersion")
        return Node(
            gpus=tuple(gpus),
            topology=self._topology(gpus, handles),
            driver_version=driver,
            cuda_driver_version=0 if cuda is None else int(cuda),
            control_devices=self._control_devices(),
            mig_minors=read_mig_minors(self._mig_minors_paths) if any(g.mig_enabled for g in gpus) else {},
        )

    def _gpu(self, index: int, handle: Any) -> GpuInfo:
        nv = self._nv
        gpu = str(index)

        def fact(fn: str) -> Any:
            return nv.call(fn, handle, gpu=gpu, context="reading GPU facts")

        uuid = text(fact("nvmlDeviceGetUUID"))
        bus_id = text(fact("nvmlDeviceGetPciInfo").busId)
        name = text(fact("nvmlDeviceGetName"))
        minor = int(fact("nvmlDeviceGetMinorNumber"))
        major_cc, minor_cc = fact("nvmlDeviceGetCudaComputeCapability")
        memory = nv.try_call("nvmlDeviceGetMemoryInfo", handle)  # as upstream: a memory error gives 0
        modes = nv.try_call("nvmlDeviceGetMigMode", handle)  # NOT_SUPPORTED on GPUs without MIG
        mig_enabled = modes is not None and modes[0] == nv.constant("NVML_DEVICE_MIG_ENABLE")
        return GpuInfo(
            index=index,
            uuid=uuid,
            minor=minor,
            name=name,
            pci_bus_id=bus_id,
            memory_bytes=0 if memory is None else int(memory.total),
            compute_capability=f"{major_cc}.{minor_cc}",
            numa_node=read_numa_node(bus_id, self._sysfs_root),
            mig_enabled=mig_enabled,
            mig_devices=self._mig_devices(gpu, handle) if mig_enabled else (),
            mig_capable=modes is not None,  # as go-nvlib: a GPU that answers its MIG mode can do MIG
            pci_class=read_pci_class(bus_id, self._sysfs_root),
            fabric=self._fabric(handle),
            vgpu=read_vgpu(bus_id, self._sysfs_root),
        )

    def _fabric(self, handle: Any) -> FabricInfo | None:
        """The GPU's NVLink fabric clique, when its fabric registration completed without error."""
        info = self._nv.fabric_info(handle)
        if info is None:
            return None
        completed = self._nv.constant("NVML_GPU_FABRIC_STATE_COMPLETED", FABRIC_STATE_COMPLETED)
        if int(info.state) != completed or int(info.status) != self._nv.constant("NVML_SUCCESS", 0):
            return None
        return FabricInfo(str(uuidlib.UUID(bytes=bytes(info.clusterUuid))), int(info.cliqueId))

    def _mig_devices(self, gpu: str, handle: Any) -> tuple[MigInfo, ...]:
        """Every MIG device of a MIG-enabled GPU. Read-only: only queries, never a MIG setting."""
        nv = self._nv
        slots = int(nv.call("nvmlDeviceGetMaxMigDeviceCount", handle, context=f"GPU {gpu}"))
        profile_indexes: dict[int, int] | None = None
        found: list[MigInfo] = []
        for slot in range(slots):
            mig_handle = nv.call_or_none("nvmlDeviceGetMigDeviceHandleByIndex", handle, slot,
                                         none_on=EMPTY_MIG_SLOT, context=f"GPU {gpu}: MIG slot {slot}")
            if mig_handle is None:
                continue
            where = f"GPU {gpu}: reading MIG device {slot}"
            uuid = text(nv.call("nvmlDeviceGetUUID", mig_handle, context=where))
            gi_id = int(nv.call("nvmlDeviceGetGpuInstanceId", mig_handle, context=where))
            ci_id = int(nv.call("nvmlDeviceGetComputeInstanceId", mig_handle, context=where))
            attrs = nv.call("nvmlDeviceGetAttributes", mig_handle, context=where)
            # The media-extension and graphics variants are only visible in the GPU instance's
            # profile: find the profile index whose ID the instance was created from.
            context = f"GPU {gpu}: reading GPU instance {gi_id} of MIG device {slot}{MIG_HINT}"
            instance = nv.call("nvmlDeviceGetGpuInstanceById", handle, gi_id, context=context)
            profile_id = int(nv.call("nvmlGpuInstanceGetInfo", instance, context=context).profileId)
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
        indexes: dict[int, int] = {}
        for index in range(self._nv.constant("NVML_GPU_INSTANCE_PROFILE_COUNT")):
            info = self._gi_profile_info(gpu, handle, index)
            if info is not None:
                indexes.setdefault(int(info.id), index)
        return indexes

    def _gi_profile_info(self, gpu: str, handle: Any, index: int) -> Any:
        """One profile's info, or None for a profile this GPU does not have."""
        nv = self._nv
        call = "nvmlDeviceGetGpuInstanceProfileInfo"
        context = f"GPU {gpu}: GPU-instance profile index {index}"
        try:
            return nv.call_or_none(call, handle, index, none_on=PROFILE_ABSENT, context=context)
        except DiscoveryError as exc:
            if not nv.failed_with(exc, "FUNCTION_NOT_FOUND"):
                raise
        # Drivers before the V call.
        return nv.call_or_none(call, handle, index, version=1, none_on=PROFILE_ABSENT, context=context)

    def _topology(self, gpus: list[GpuInfo], handles: dict[str, Any]) -> Topology:
        """The NVLink ends of every GPU and the PCIe level of every pair, read once at discovery;
        topology.build_topology says what they mean."""
        nv = self._nv
        links = {g.uuid: self._nvlink_ends(handles[g.uuid]) for g in gpus}
        pcie: dict[frozenset[str], PcieLevel] = {}
        for i, a in enumerate(gpus):
            for b in gpus[i + 1 :]:
                level = nv.try_call("nvmlDeviceGetTopologyCommonAncestor", handles[a.uuid], handles[b.uuid])
                if level is None:
                    continue
                with contextlib.suppress(ValueError):  # a level newer than our table: not recorded
                    pcie[frozenset((a.uuid, b.uuid))] = PcieLevel(int(level))
        return build_topology(gpus, links, pcie)

    def _nvlink_ends(self, handle: Any) -> list[NvLinkEnd]:
        nv = self._nv
        far_kinds = {
            nv.constant("NVML_NVLINK_DEVICE_TYPE_GPU", 0): Far.GPU,
            nv.constant("NVML_NVLINK_DEVICE_TYPE_IBMNPU", 1): Far.OTHER,
            nv.constant("NVML_NVLINK_DEVICE_TYPE_SWITCH", 2): Far.SWITCH,
        }
        enabled = nv.constant("NVML_FEATURE_ENABLED")
        knows_far_type = nv.has("nvmlDeviceGetNvLinkRemoteDeviceType")  # older bindings lack it
        ends = []
        for link in range(nv.constant("NVML_NVLINK_MAX_LINKS", NVLINK_MAX_LINKS)):
            # NOT_SUPPORTED on PCIe-only GPUs, or a link index past the last: no link there.
            if nv.try_call("nvmlDeviceGetNvLinkState", handle, link) != enabled:
                continue
            remote = nv.try_call("nvmlDeviceGetNvLinkRemotePciInfo", handle, link)
            if remote is None:
                continue
            far_type = nv.try_call("nvmlDeviceGetNvLinkRemoteDeviceType", handle, link) if knows_far_type else None
            far = Far.UNKNOWN if far_type is None else far_kinds.get(int(far_type), Far.UNKNOWN)
            ends.append(NvLinkEnd(text(remote.busId), far))
        return ends

    def _control_devices(self) -> tuple[str, ...]:
        # As the official plugin: a control node is passed only if it exists in our own container.
        return tuple(p for p in CONTROL_DEVICES if os.path.exists(p))

    # --- health source ---------------------------------------------------------------------

    def watch_events(self, node: Node) -> NvmlEventWaiter:
        return NvmlEventWaiter(self._nv, node.gpus)

    def probe(self, gpus: Sequence[str]) -> Mapping[str, ProbeSample]:
        return {uuid: probe_gpu(self._nv, uuid) for uuid in gpus}

    def usage(self, gpu: str) -> GpuUsage:
        return gpu_usage(self._nv, gpu)
