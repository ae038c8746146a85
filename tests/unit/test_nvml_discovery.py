"""Full-GPU discovery in the NVML backend against the fake pynvml (no driver needed)."""

from __future__ import annotations

from pathlib import Path

import pynvml
import pytest

from nvdp.backends.nvml.discovery import NvmlBackend
from tests.unit.test_nvml_mig import FakeGpu, FakeNvml


class LostSecondGpu(FakeNvml):
    """GPU 1 fell off the bus before the plugin started: every query of it fails."""

    def nvmlDeviceGetUUID(self, h: object) -> str:
        if h is self.gpus[1]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return super().nvmlDeviceGetUUID(h)  # type: ignore[arg-type]


def test_full_gpus_with_numa_from_sysfs(tmp_path: Path) -> None:
    folder = tmp_path / "bus/pci/devices/0000:19:00.0"
    folder.mkdir(parents=True)
    (folder / "numa_node").write_text("1\n")
    fake = FakeNvml([FakeGpu("GPU-0", 0, mig_enabled=False), FakeGpu("GPU-1", 1, mig_enabled=False)])
    node = NvmlBackend(sysfs_root=str(tmp_path), nvml=fake).discover()
    assert [(g.index, g.uuid, g.minor, g.numa_node) for g in node.gpus] == [
        (0, "GPU-0", 0, None), (1, "GPU-1", 1, 1)
    ]
    assert node.gpus[1].pci_bus_id == "00000000:19:00.0"
    assert node.gpus[0].compute_capability == "9.0" and node.driver_version == "580.159.04"


def test_a_lost_gpu_is_skipped_and_the_others_served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake = LostSecondGpu([FakeGpu(f"GPU-{i}", i, mig_enabled=False) for i in range(3)])
    node = NvmlBackend(sysfs_root=str(tmp_path), nvml=fake).discover()
    assert [g.uuid for g in node.gpus] == ["GPU-0", "GPU-2"]
    assert any("GPU skipped" in r.message and "lost" in str(r.__dict__.get("error", "")).lower()
               for r in caplog.records)
