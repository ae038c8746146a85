"""The discovery facts GPU feature discovery labels besides the plugin's: MIG capability, PCI
class, fabric clique and vGPU host (NVML backend through the fake NVML and sysfs files, the
simulated profiles, and the pure PCI parsing)."""

from __future__ import annotations

import ctypes
import uuid
from pathlib import Path
from typing import Any

import pynvml
import pytest

from nvdp.backends.nvml.discovery import NvmlBackend
from nvdp.backends.nvml.seam import Nvml
from nvdp.backends.simulated.expand import build_node
from nvdp.backends.simulated.profile import Profile, load_profile
from nvdp.core import pci
from nvdp.core.devices import FabricInfo, VgpuInfo
from nvdp.errors import ConfigError
from nvdp.testing.fake_nvml import FakeFabric, FakeGpu, FakeNvml, h200_gpu, h200_node

# ---------------------------------------------------------------------------------------------
# PCI config space: built here byte by byte (capability list at 0x40, vendor capability at 0x50)


def config_space(vendor_cap: bytes | None, status_caps: bool = True, size: int = 256) -> bytes:
    data = bytearray(size)
    data[0:2] = b"\xde\x10"  # NVIDIA
    if status_caps:
        data[0x06] = 0x10
    data[0x34] = 0x40
    data[0x40:0x43] = bytes([0x01, 0x50 if vendor_cap else 0x00, 0x08])  # a power-management capability first
    if vendor_cap:
        data[0x50 : 0x50 + len(vendor_cap)] = vendor_cap
    return bytes(data)


def vgpu_capability(version: str, branch: str, records_before: int = 0) -> bytes:
    """Vendor capability: id 0x09, next 0, length, then "VF", then records; record 0 = driver."""
    records = b"".join(bytes([0x05, 0x03, 0xAA]) for _ in range(records_before))  # id 5, length 3
    driver = bytes([0x00, 22]) + version.encode().ljust(10, b"\x00") + branch.encode().ljust(10, b"\x00")
    body = b"VF" + records + driver
    return bytes([0x09, 0x00, 3 + len(body)]) + body


def test_pci_class() -> None:
    assert pci.parse_class("0x030200\n") == pci.CLASS_3D_CONTROLLER
    assert pci.parse_class("0x030000") == pci.CLASS_VGA
    assert pci.parse_class("garbage") is None


@pytest.mark.parametrize("before", [0, 2])
def test_vgpu_capability_with_a_driver_record(before: int) -> None:
    config = config_space(vgpu_capability("535.161.08", "r535_00", records_before=before))
    assert pci.vgpu_info(config) == VgpuInfo("535.161.08", "r535_00")


def test_not_a_vgpu() -> None:
    assert pci.vgpu_info(config_space(None)) is None  # no vendor capability (a passthrough GPU)
    assert pci.vgpu_info(config_space(bytes([0x09, 0x00, 0x08]) + b"XX" + bytes(3))) is None  # no "VF"
    assert pci.vgpu_info(config_space(vgpu_capability("1", "r1"), status_caps=False)) is None
    assert pci.vgpu_info(config_space(vgpu_capability("1", "r1"), size=64)) is None  # unprivileged read


def test_a_vgpu_without_a_driver_record_gives_empty_strings() -> None:
    cap = bytes([0x09, 0x00, 0x08]) + b"VF" + bytes([0x05, 0x03, 0x00])  # record 5 only, chain ends
    assert pci.vgpu_info(config_space(cap)) == VgpuInfo("", "")


def test_a_looping_capability_chain_ends() -> None:
    data = bytearray(config_space(None))
    data[0x41] = 0x40  # the first capability points to itself
    assert pci.vendor_capability(bytes(data)) is None


# ---------------------------------------------------------------------------------------------
# NVML backend


CLUSTER = uuid.UUID("4a6f0e2c-51a3-4c1e-9a43-7b0c61d5e8f2")


def backend(fake: FakeNvml, root: Path) -> NvmlBackend:
    fake.write_node_files(root)
    return NvmlBackend(driver_root=str(root), sysfs_root=str(root), nvml=fake)


def test_nvml_facts_for_labels(tmp_path: Path) -> None:
    fake = h200_node(3)
    fake.gpu(0).fabric = FakeFabric(CLUSTER.bytes, 7)
    fake.gpu(1).fabric = FakeFabric(CLUSTER.bytes, 7, state=FakeNvml.NVML_GPU_FABRIC_STATE_IN_PROGRESS)
    fake.gpu(1).pci_class = 0x030000
    fake.gpu(2).pci_class = None
    fake.gpu(2).mig_supported = False
    fake.gpu(0).pci_config = config_space(vgpu_capability("550.90.07", "r550_00"))
    node = backend(fake, tmp_path).discover()
    g0, g1, g2 = node.gpus
    assert (g0.mig_capable, g1.mig_capable, g2.mig_capable) == (True, True, False)
    assert (g0.pci_class, g1.pci_class, g2.pci_class) == (0x030200, 0x030000, None)
    assert g0.fabric == FabricInfo(str(CLUSTER), 7)
    assert g1.fabric is None  # registration not completed
    assert g2.fabric is None  # NOT_SUPPORTED
    assert (g0.vgpu, g1.vgpu) == (VgpuInfo("550.90.07", "r550_00"), None)
    assert (node.driver_version, node.cuda_driver_version) == ("580.159.04", 13000)


def test_fabric_failure_status_is_not_attached(tmp_path: Path) -> None:
    fake = h200_node(1)
    fake.gpu(0).fabric = FakeFabric(CLUSTER.bytes, 3, status=FakeNvml.NVML_ERROR_UNKNOWN)
    assert backend(fake, tmp_path).discover().gpus[0].fabric is None


def test_fabric_falls_back_to_the_older_call(tmp_path: Path) -> None:
    fake = h200_node(1)
    fake.gpu(0).fabric = FakeFabric(CLUSTER.bytes, 9)
    fake.fail("nvmlDeviceGetGpuFabricInfoV", "FUNCTION_NOT_FOUND")
    assert backend(fake, tmp_path).discover().gpus[0].fabric == FabricInfo(str(CLUSTER), 9)
    assert fake.called("nvmlDeviceGetGpuFabricInfo")


def test_the_driver_and_cuda_version_calls(tmp_path: Path) -> None:
    fake = FakeNvml([h200_gpu(0)], driver_version="550.54", cuda_driver_version=12040)
    node = backend(fake, tmp_path).discover()
    assert (node.driver_version, node.cuda_driver_version) == ("550.54", 12040)
    assert fake.called("nvmlSystemGetDriverVersion") and fake.called("nvmlSystemGetCudaDriverVersion")
    fake.fail("nvmlSystemGetCudaDriverVersion", "NOT_SUPPORTED")
    assert NvmlBackend(sysfs_root=str(tmp_path), nvml=fake).discover().cuda_driver_version == 0


def test_fabric_info_passes_a_pointer_to_pynvml_structures() -> None:
    """With the real bindings the seam hands the C call a pointer to pynvml's own structure."""
    seen: list[Any] = []

    class Module:
        NVMLError = pynvml.NVMLError
        c_nvmlGpuFabricInfoV_t = pynvml.c_nvmlGpuFabricInfoV_t

        @staticmethod
        def nvmlDeviceGetGpuFabricInfoV(handle: object, pointer: Any) -> int:
            seen.append(pointer)
            info = pointer._obj  # what ctypes.byref points to
            info.cliqueId, info.state = 11, 3
            ctypes.memmove(info.clusterUuid, CLUSTER.bytes, 16)
            return 0

    info = Nvml(Module).fabric_info(object())
    assert isinstance(info, pynvml.c_nvmlGpuFabricInfoV_t)
    assert (info.cliqueId, bytes(info.clusterUuid)) == (11, CLUSTER.bytes)
    assert type(seen[0]).__name__ == "CArgObject"  # ctypes.byref


def test_no_fabric_calls_in_old_bindings() -> None:
    class Module:
        NVMLError = pynvml.NVMLError

    assert Nvml(Module).fabric_info(object()) is None


# ---------------------------------------------------------------------------------------------
# Simulated profiles


def profile(**gpu: Any) -> Profile:
    return Profile.model_validate({"gpus": [{"name": "NVIDIA L40S", **gpu}]})


def test_simulated_defaults() -> None:
    l40s = build_node("p", profile()).gpus[0]
    assert (l40s.mig_capable, l40s.pci_class, l40s.fabric, l40s.vgpu) == (False, 0x030200, None, None)
    h100 = build_node(*load_profile("dgx-h100")).gpus[0]
    assert h100.mig_capable  # a model with a MIG profile table
    assert build_node("p", profile(mig={"enabled": False})).gpus[0].mig_capable  # a mig block says it can


def test_simulated_facts() -> None:
    node = build_node("p", profile(
        count=2, pci_class="0x030000", mig_capable=True,
        fabric={"cluster_uuid": str(CLUSTER).upper(), "clique_id": 4},
        vgpu={"host_driver_version": "550.90.07", "host_driver_branch": "r550_00"},
    ))
    for g in node.gpus:
        assert (g.pci_class, g.mig_capable) == (0x030000, True)
        assert g.fabric == FabricInfo(str(CLUSTER), 4)
        assert g.vgpu == VgpuInfo("550.90.07", "r550_00")
    assert build_node("p", profile(pci_class=None)).gpus[0].pci_class is None  # null: no class file
    assert build_node("p", profile(pci_class=0x030200)).gpus[0].pci_class == 0x030200


@pytest.mark.parametrize(("gpu", "field"), [
    ({"pci_class": "vga"}, "gpus.0.pci_class"),
    ({"fabric": {"cluster_uuid": "not-a-uuid", "clique_id": 1}}, "gpus.0.fabric.cluster_uuid"),
    ({"fabric": {"cluster_uuid": str(CLUSTER), "clique_id": -1}}, "gpus.0.fabric.clique_id"),
    ({"vgpu": {"host_driver_version": "1"}}, "gpus.0.vgpu.host_driver_branch"),
])
def test_bad_simulated_facts_name_the_field(gpu: dict[str, Any], field: str, tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"gpus": [{"name": "NVIDIA L40S", **gpu}]}))
    with pytest.raises(ConfigError) as caught:
        load_profile(str(path))
    assert field in str(caught.value)


def test_fake_gpu_defaults_keep_old_tests_meaning() -> None:
    gpu = FakeGpu(uuid="GPU-x", minor=0, bus_id="00000000:01:00.0")
    assert (gpu.fabric, gpu.pci_class, gpu.pci_config) == (None, 0x030200, None)
