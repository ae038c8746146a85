"""Read-only MIG checks on a real GPU (`make gpu-test`). Nothing here changes a MIG or GPU setting:
profile infos and MIG handles are queries, and MIG mode is only read."""

from __future__ import annotations

from typing import Any

import pytest

from nvdp.backends.nvml.discovery import NvmlBackend
from nvdp.core import mig
from nvdp.core.devices import GpuInfo, MigInfo

pytestmark = pytest.mark.gpu


def _mig_capable_handles() -> list[Any]:
    import pynvml

    handles = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        try:
            pynvml.nvmlDeviceGetMigMode(handle)
        except pynvml.NVMLError:
            continue  # not MIG-capable
        handles.append(handle)
    return handles


def test_our_names_are_the_drivers_names_for_every_profile() -> None:
    """Works with MIG disabled: the driver names every GPU-instance profile it supports; our
    rounding and attribute rules must give the same name from its memory and profile index."""
    import pynvml

    backend = NvmlBackend()
    try:
        handles = _mig_capable_handles()
        if not handles:
            pytest.skip("no MIG-capable GPU")
        checked = 0
        for handle in handles:
            total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            parent = GpuInfo(index=0, uuid="GPU", minor=0, name="", pci_bus_id="", memory_bytes=total,
                             compute_capability="")
            for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
                try:
                    info = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index)
                except pynvml.NVMLError:
                    continue
                slices, attributes, neg = mig.GI_PROFILE_INDEXES[index]
                device = MigInfo(slot=0, uuid="", gi_id=0, ci_id=0, gi_slices=int(info.sliceCount),
                                 ci_slices=int(info.sliceCount), memory_mb=int(info.memorySizeMB),
                                 attributes=attributes, neg_attributes=neg)
                name = info.name.decode() if isinstance(info.name, bytes) else str(info.name)
                assert slices == info.sliceCount
                assert f"MIG {mig.profile_of(parent, device)}" == name
                checked += 1
        assert checked > 0
    finally:
        backend.close()


def test_discovered_mig_devices_match_nvml() -> None:
    import pynvml

    backend = NvmlBackend()
    try:
        node = backend.discover()
        enabled = [g for g in node.gpus if g.mig_enabled]
        if not any(g.mig_devices for g in enabled):
            pytest.skip("no GPU with MIG devices on this node (nvdp never creates them)")
        for gpu in enabled:
            handle = pynvml.nvmlDeviceGetHandleByIndex(gpu.index)
            for m in gpu.mig_devices:
                mig_handle = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, m.slot)
                assert m.uuid == pynvml.nvmlDeviceGetUUID(mig_handle)
                assert m.gi_id == pynvml.nvmlDeviceGetGpuInstanceId(mig_handle)
                assert m.ci_id == pynvml.nvmlDeviceGetComputeInstanceId(mig_handle)
    finally:
        backend.close()
