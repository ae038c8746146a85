"""MIG discovery in the NVML backend, against a fake pynvml (no driver needed).

The fake answers the read-only NVML calls nvdp makes, with NVML's real error class and constants;
any other call (a MIG or GPU setting) does not exist on it and would fail the test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from nvdp.backends.nvml.discovery import NvmlBackend
from nvdp.config.load import load
from nvdp.core import mig
from nvdp.core.migprofiles import H100_80GB_HBM3
from nvdp.core.resources import build_tree
from nvdp.errors import DiscoveryError


@dataclass
class FakeMig:
    uuid: str
    gi_id: int
    ci_id: int
    profile_id: int  # the GPU instance's profile ID (19 = 1g.10gb, 20 = 1g.10gb+me, ...)
    gi_slices: int
    ci_slices: int
    memory_mb: int


@dataclass
class FakeGpu:
    uuid: str
    minor: int
    mig_enabled: bool
    slots: dict[int, FakeMig] = field(default_factory=dict)
    max_slots: int = 7


def _fail(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


class FakeNvml(SimpleNamespace):
    """The subset of pynvml nvdp uses, over a list of FakeGpu."""

    NVMLError = pynvml.NVMLError

    def __init__(self, gpus: list[FakeGpu], profile_info_v2: bool = True) -> None:
        super().__init__()
        for name in dir(pynvml):
            if name.startswith("NVML_"):
                setattr(self, name, getattr(pynvml, name))
        self.nvmlLib = object()  # "already loaded": no CDLL
        self.gpus = gpus
        self.profile_info_v2 = profile_info_v2
        self.calls: list[str] = []

    # system
    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.159.04"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000

    # GPUs
    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h: FakeGpu | FakeMig) -> str:
        return h.uuid

    def nvmlDeviceGetPciInfo(self, h: FakeGpu) -> Any:
        return SimpleNamespace(busId=f"00000000:{0x18 + h.minor:02X}:00.0".encode())

    def nvmlDeviceGetName(self, h: FakeGpu) -> str:
        return H100_80GB_HBM3.name

    def nvmlDeviceGetMinorNumber(self, h: FakeGpu) -> int:
        return h.minor

    def nvmlDeviceGetCudaComputeCapability(self, h: FakeGpu) -> tuple[int, int]:
        return (9, 0)

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> Any:
        return SimpleNamespace(total=H100_80GB_HBM3.memory_bytes)

    def nvmlDeviceGetMigMode(self, h: FakeGpu) -> tuple[int, int]:
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if h.mig_enabled else pynvml.NVML_DEVICE_MIG_DISABLE
        return (mode, mode)

    def nvmlDeviceGetNvLinkState(self, h: FakeGpu, link: int) -> int:
        raise _fail(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetTopologyCommonAncestor(self, a: FakeGpu, b: FakeGpu) -> int:
        return 40

    # MIG (read-only queries)
    def nvmlDeviceGetMaxMigDeviceCount(self, h: FakeGpu) -> int:
        return h.max_slots

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: FakeGpu, slot: int) -> FakeMig:
        if slot >= h.max_slots:
            raise _fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if slot not in h.slots:
            raise _fail(pynvml.NVML_ERROR_NOT_FOUND)
        return h.slots[slot]

    def nvmlDeviceGetGpuInstanceId(self, m: FakeMig) -> int:
        return m.gi_id

    def nvmlDeviceGetComputeInstanceId(self, m: FakeMig) -> int:
        return m.ci_id

    def nvmlDeviceGetAttributes(self, m: FakeMig) -> Any:
        return SimpleNamespace(
            multiprocessorCount=16 * m.ci_slices, sharedCopyEngineCount=m.gi_slices, sharedDecoderCount=1,
            sharedEncoderCount=0, sharedJpegCount=1, sharedOfaCount=int(m.profile_id == 20),
            gpuInstanceSliceCount=m.gi_slices, computeInstanceSliceCount=m.ci_slices, memorySizeMB=m.memory_mb,
        )

    def nvmlDeviceGetGpuInstanceById(self, h: FakeGpu, gi_id: int) -> FakeMig:
        self.calls.append(f"gi {gi_id}")
        found = next((m for m in h.slots.values() if m.gi_id == gi_id), None)
        if found is None:
            raise _fail(pynvml.NVML_ERROR_NOT_FOUND)
        return found

    def nvmlGpuInstanceGetInfo(self, gi: FakeMig) -> Any:
        return SimpleNamespace(id=gi.gi_id, profileId=gi.profile_id)

    def nvmlDeviceGetGpuInstanceProfileInfo(self, h: FakeGpu, index: int, version: int = 2) -> Any:
        self.calls.append(f"profile {index} v{version}")
        if version == 2 and not self.profile_info_v2:
            raise _fail(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        profile = next((p for p in H100_80GB_HBM3.profiles if p.index == index), None)
        if profile is None:
            raise _fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(id=profile.id, sliceCount=profile.slices, memorySizeMB=profile.memory_mb)


def h100_node() -> list[FakeGpu]:
    layout = {
        0: FakeMig("MIG-a", gi_id=2, ci_id=0, profile_id=9, gi_slices=3, ci_slices=3, memory_mb=40448),
        # slot 1 empty: j is NVML's slot, not a counter
        2: FakeMig("MIG-b", gi_id=9, ci_id=0, profile_id=20, gi_slices=1, ci_slices=1, memory_mb=9984),
        5: FakeMig("MIG-c", gi_id=1, ci_id=1, profile_id=9, gi_slices=3, ci_slices=1, memory_mb=40448),
    }
    return [FakeGpu("GPU-0", 0, mig_enabled=False), FakeGpu("GPU-1", 1, mig_enabled=True, slots=layout)]


def driver_root(tmp_path: Path, minors: str | None) -> str:
    if minors is not None:
        caps = tmp_path / "proc" / "driver" / "nvidia-caps"
        caps.mkdir(parents=True)
        (caps / "mig-minors").write_text(minors)
    return str(tmp_path)


MINORS = "config 1\nmonitor 2\ngpu1/gi2/access 156\ngpu1/gi2/ci0/access 157\ngpu1/gi9/access 219\n" \
         "gpu1/gi9/ci0/access 220\ngpu1/gi1/access 147\ngpu1/gi1/ci1/access 149\n"


def test_mig_devices_with_slots_profiles_and_capabilities(tmp_path: Path) -> None:
    fake = FakeNvml(h100_node())
    backend = NvmlBackend(driver_root=driver_root(tmp_path, MINORS), sysfs_root=str(tmp_path), nvml=fake)
    node = backend.discover()
    plain, migged = node.gpus
    assert plain.mig_devices == () and migged.mig_enabled
    assert [(m.slot, m.uuid, m.gi_id, m.ci_id) for m in migged.mig_devices] == [
        (0, "MIG-a", 2, 0), (2, "MIG-b", 9, 0), (5, "MIG-c", 1, 1)
    ]
    assert [str(p) for _, _, p in mig.profiles_on(node)] == ["3g.40gb", "1g.10gb+me", "1c.3g.40gb"]
    assert node.mig_minors["gpu1/gi9/ci0/access"] == 220

    tree = build_tree(node, load({"mig_strategy": "mixed", "pass_device_specs": "true"}, {}))
    assert {n: [(d.id, d.index, d.paths) for d in r.devices] for n, r in tree.items()} == {
        "nvidia.com/gpu": [("GPU-0", "0", ("/dev/nvidia0",))],
        "nvidia.com/mig-3g.40gb": [
            ("MIG-a", "1:0", ("/dev/nvidia1", "/dev/nvidia-caps/nvidia-cap156", "/dev/nvidia-caps/nvidia-cap157"))
        ],
        "nvidia.com/mig-1g.10gb.me": [
            ("MIG-b", "1:2", ("/dev/nvidia1", "/dev/nvidia-caps/nvidia-cap219", "/dev/nvidia-caps/nvidia-cap220"))
        ],
    }
    # Profile infos are read once per GPU, every index tried.
    assert sum(c.startswith("profile") for c in fake.calls) == pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT


def test_old_driver_without_profile_info_v2(tmp_path: Path) -> None:
    fake = FakeNvml(h100_node(), profile_info_v2=False)
    node = NvmlBackend(driver_root=driver_root(tmp_path, MINORS), sysfs_root=str(tmp_path), nvml=fake).discover()
    assert [m.attributes for m in node.gpus[1].mig_devices] == [(), ("me",), ()]
    assert "profile 7 v1" in fake.calls


def test_unknown_gpu_instance_profile_is_a_discovery_error(tmp_path: Path) -> None:
    gpus = h100_node()
    gpus[1].slots[0].profile_id = 77
    backend = NvmlBackend(driver_root=driver_root(tmp_path, MINORS), sysfs_root=str(tmp_path), nvml=FakeNvml(gpus))
    with pytest.raises(DiscoveryError, match="GPU 1: MIG device 0 uses GPU instance profile 77"):
        backend.discover()


def test_unreadable_gpu_instance_names_the_call_and_the_fix(tmp_path: Path) -> None:
    fake = FakeNvml(h100_node())

    def no_permission(h: FakeGpu, gi_id: int) -> None:
        raise _fail(pynvml.NVML_ERROR_NO_PERMISSION)

    fake.nvmlDeviceGetGpuInstanceById = no_permission
    backend = NvmlBackend(driver_root=driver_root(tmp_path, MINORS), sysfs_root=str(tmp_path), nvml=fake)
    with pytest.raises(DiscoveryError, match="NVIDIA_MIG_MONITOR_DEVICES=all"):
        backend.discover()


def test_mig_minors_unparsable_lines_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = driver_root(tmp_path, MINORS + "garbage here\n")
    node = NvmlBackend(driver_root=root, sysfs_root=str(tmp_path), nvml=FakeNvml(h100_node())).discover()
    assert node.mig_minors["gpu1/gi2/access"] == 156
    assert any(getattr(r, "line", "") == "garbage here" for r in caplog.records)


def test_no_mig_gpu_reads_no_mig_minors(tmp_path: Path) -> None:
    gpus = [FakeGpu("GPU-0", 0, mig_enabled=False)]
    backend = NvmlBackend(driver_root=driver_root(tmp_path, MINORS), sysfs_root=str(tmp_path), nvml=FakeNvml(gpus))
    assert backend.discover().mig_minors == {}
