"""MIG discovery in the NVML backend, against nvdp's fake pynvml (no driver needed).

The fake answers only the read-only NVML calls; any other call (a MIG or GPU setting) does not
exist on it and would fail the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nvdp.backends.nvml.discovery import NvmlBackend
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.load import load
from nvdp.core import mig
from nvdp.core.migprofiles import H100_80GB_HBM3
from nvdp.core.resources import build_tree
from nvdp.errors import DiscoveryError
from nvdp.testing.fake_nvml import FakeCall, FakeGpu, FakeMigDevice, FakeNvml, h200_node

PROFILE_INFO = "nvmlDeviceGetGpuInstanceProfileInfo"


def h100(uuid: str, minor: int, mig_devices: dict[int, FakeMigDevice] | None = None) -> FakeGpu:
    return FakeGpu(uuid, minor, f"00000000:{0x18 + minor:02X}:00.0", name=H100_80GB_HBM3.name,
                   memory_bytes=H100_80GB_HBM3.memory_bytes, gi_profiles=H100_80GB_HBM3.profiles,
                   mig_enabled=mig_devices is not None, mig_devices=mig_devices or {})


def h100_node() -> list[FakeGpu]:
    layout = {
        0: FakeMigDevice("MIG-a", gi_id=2, ci_id=0, profile_id=9, gi_slices=3, ci_slices=3, memory_mb=40448),
        # slot 1 empty: j is NVML's slot, not a counter
        2: FakeMigDevice("MIG-b", gi_id=9, ci_id=0, profile_id=20, gi_slices=1, ci_slices=1, memory_mb=9984),
        5: FakeMigDevice("MIG-c", gi_id=1, ci_id=1, profile_id=9, gi_slices=3, ci_slices=1, memory_mb=40448),
    }
    return [h100("GPU-0", 0), h100("GPU-1", 1, layout)]


def driver_root(tmp_path: Path, minors: str | None) -> str:
    if minors is not None:
        caps = tmp_path / "proc" / "driver" / "nvidia-caps"
        caps.mkdir(parents=True)
        (caps / "mig-minors").write_text(minors)
    return str(tmp_path)


MINORS = "config 1\nmonitor 2\ngpu1/gi2/access 156\ngpu1/gi2/ci0/access 157\ngpu1/gi9/access 219\n" \
         "gpu1/gi9/ci0/access 220\ngpu1/gi1/access 147\ngpu1/gi1/ci1/access 149\n"


def backend(tmp_path: Path, fake: FakeNvml, minors: str | None = MINORS) -> NvmlBackend:
    return NvmlBackend(driver_root=driver_root(tmp_path, minors), sysfs_root=str(tmp_path), nvml=fake)


def test_mig_devices_with_slots_profiles_and_capabilities(tmp_path: Path) -> None:
    fake = FakeNvml(h100_node())
    node = backend(tmp_path, fake).discover()
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
    assert len(fake.called(PROFILE_INFO)) == FakeNvml.NVML_GPU_INSTANCE_PROFILE_COUNT


def test_old_driver_without_profile_info_v2(tmp_path: Path) -> None:
    fake = FakeNvml(h100_node(), profile_info_v2=False)
    node = backend(tmp_path, fake).discover()
    assert [m.attributes for m in node.gpus[1].mig_devices] == [(), ("me",), ()]
    assert FakeCall(PROFILE_INFO, "GPU-1", (7, 1)) in fake.calls


def test_unknown_gpu_instance_profile_is_a_discovery_error(tmp_path: Path) -> None:
    gpus = h100_node()
    gpus[1].mig_devices[0].profile_id = 77
    with pytest.raises(DiscoveryError, match="GPU 1: MIG device 0 uses GPU instance profile 77"):
        backend(tmp_path, FakeNvml(gpus)).discover()


def test_unreadable_gpu_instance_names_the_call_and_the_fix(tmp_path: Path) -> None:
    fake = FakeNvml(h100_node())
    fake.fail("nvmlDeviceGetGpuInstanceById", "NO_PERMISSION")
    with pytest.raises(DiscoveryError, match="NVIDIA_MIG_MONITOR_DEVICES=all") as caught:
        backend(tmp_path, fake).discover()
    assert str(caught.value).endswith("nvmlDeviceGetGpuInstanceById: Insufficient Permissions")


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        pytest.param("nvmlDeviceGetMaxMigDeviceCount", "UNKNOWN",
                     "GPU 1: nvmlDeviceGetMaxMigDeviceCount: Unknown Error", id="slot count"),
        pytest.param("nvmlDeviceGetMigDeviceHandleByIndex", "NO_PERMISSION",
                     "GPU 1: MIG slot 0: nvmlDeviceGetMigDeviceHandleByIndex: Insufficient Permissions",
                     id="a slot, not merely empty"),
        pytest.param("nvmlDeviceGetAttributes", "UNKNOWN",
                     "GPU 1: reading MIG device 0: nvmlDeviceGetAttributes: Unknown Error", id="MIG device facts"),
        pytest.param(PROFILE_INFO, "UNKNOWN",
                     f"GPU 1: GPU-instance profile index 0: {PROFILE_INFO}: Unknown Error", id="profile info"),
    ],
)
def test_failing_mig_queries_name_the_gpu_and_the_call(tmp_path: Path, call: str, code: str, message: str) -> None:
    fake = FakeNvml(h100_node())
    fake.fail(call, code, gpu="GPU-1")
    with pytest.raises(DiscoveryError) as caught:
        backend(tmp_path, fake).discover()
    assert str(caught.value) == message


def test_mig_minors_unparsable_lines_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = backend(tmp_path, FakeNvml(h100_node()), MINORS + "garbage here\n").discover()
    assert node.mig_minors["gpu1/gi2/access"] == 156
    assert any(getattr(r, "line", "") == "garbage here" for r in caplog.records)


def test_no_mig_gpu_reads_no_mig_minors(tmp_path: Path) -> None:
    assert backend(tmp_path, FakeNvml([h100("GPU-0", 0)])).discover().mig_minors == {}


def test_h200_mig_layout_matches_the_simulated_profile(tmp_path: Path) -> None:
    """The ready-made H200 node with the h200-mig profile's layout: NVML discovery names the same
    profiles as the simulator, and the capability nodes come from the node's mig-minors."""
    layout = ["3g.71gb", "2g.35gb", "1g.18gb+me", "1g.18gb"]
    fake = h200_node(gpus=1, mig_layout={0: layout})
    fake.write_node_files(tmp_path)
    node = NvmlBackend(driver_root=str(tmp_path), sysfs_root=str(tmp_path), nvml=fake).discover()
    simulated = SimulatedBackend("h200-mig").discover()
    assert [str(p) for _, _, p in mig.profiles_on(node)] == layout
    assert [str(p) for _, _, p in mig.profiles_on(node)] == [str(p) for _, _, p in mig.profiles_on(simulated)]
    tree = build_tree(node, load({"mig_strategy": "mixed"}, {}))
    assert sorted(tree) == ["nvidia.com/mig-1g.18gb", "nvidia.com/mig-1g.18gb.me", "nvidia.com/mig-2g.35gb",
                            "nvidia.com/mig-3g.71gb"]
    # GPU instance 1 of GPU minor 0: the driver's first GI access minor after config and monitor.
    assert node.mig_minors["gpu0/gi1/access"] == 3 + 9 and node.mig_minors["gpu0/gi1/ci0/access"] == 3 + 9 + 1
