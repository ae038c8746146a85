"""Full-GPU discovery in the NVML backend against nvdp's fake pynvml (no driver needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvdp.backends.nvml.discovery import NvmlBackend
from nvdp.backends.nvml.library import library_candidates
from nvdp.core.devices import PcieLevel
from nvdp.core.migprofiles import H200
from nvdp.errors import DiscoveryError, NvmlUnavailable
from nvdp.testing.fake_nvml import H200_FIXTURE_UUID, FakeGpu, FakeNvml, h200_node

FIXTURE = Path(__file__).parents[1] / "fixtures" / "nvidia-h200" / "nvml-snapshot.json"


def plain_gpus(count: int) -> list[FakeGpu]:
    return [FakeGpu(f"GPU-{i}", i, f"00000000:{0x18 + i:02X}:00.0") for i in range(count)]


def test_full_gpus_with_numa_from_sysfs(tmp_path: Path) -> None:
    folder = tmp_path / "bus/pci/devices/0000:19:00.0"
    folder.mkdir(parents=True)
    (folder / "numa_node").write_text("1\n")
    node = NvmlBackend(sysfs_root=str(tmp_path), nvml=FakeNvml(plain_gpus(2))).discover()
    assert [(g.index, g.uuid, g.minor, g.numa_node) for g in node.gpus] == [
        (0, "GPU-0", 0, None), (1, "GPU-1", 1, 1)
    ]
    assert node.gpus[1].pci_bus_id == "00000000:19:00.0"
    assert node.gpus[0].compute_capability == "9.0" and node.driver_version == "580.159.04"
    assert node.cuda_driver_version == 13000 and not node.gpus[0].mig_enabled


@pytest.mark.parametrize("how", ["injected", "lost"])
def test_a_lost_gpu_is_skipped_and_the_others_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """GPU 1 fell off the bus before the plugin started: every query of it fails."""
    fake = FakeNvml(plain_gpus(3))
    if how == "injected":
        fake.fail("nvmlDeviceGetUUID", "GPU_IS_LOST", gpu="GPU-1")
    else:
        fake.gpu(1).lost = True
    node = NvmlBackend(sysfs_root=str(tmp_path), nvml=fake).discover()
    assert [g.uuid for g in node.gpus] == ["GPU-0", "GPU-2"]
    errors = [str(r.__dict__.get("error", "")) for r in caplog.records if "GPU skipped" in r.message]
    assert len(errors) == 1 and errors[0].startswith("GPU 1: ") and "GPU is lost" in errors[0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param("nvmlDeviceGetCount", "nvmlDeviceGetCount: Unknown Error", id="count"),
        pytest.param("nvmlSystemGetDriverVersion", "nvmlSystemGetDriverVersion: Unknown Error", id="driver version"),
    ],
)
def test_node_wide_failures_are_discovery_errors_naming_the_call(tmp_path: Path, call: str, message: str) -> None:
    fake = FakeNvml(plain_gpus(2))
    fake.fail(call, "UNKNOWN")
    with pytest.raises(DiscoveryError) as caught:
        NvmlBackend(sysfs_root=str(tmp_path), nvml=fake).discover()
    assert str(caught.value) == message


def test_optional_facts_fall_back_as_upstream(tmp_path: Path) -> None:
    fake = FakeNvml(plain_gpus(2))
    fake.fail("nvmlSystemGetCudaDriverVersion", "FUNCTION_NOT_FOUND")
    fake.fail("nvmlDeviceGetMemoryInfo", "UNKNOWN", gpu=0)
    fake.fail("nvmlDeviceGetMigMode", "NOT_SUPPORTED", gpu=1)
    fake.gpu(1).mig_enabled = True  # ignored: NVML did not say so
    node = NvmlBackend(sysfs_root=str(tmp_path), nvml=fake).discover()
    assert node.cuda_driver_version == 0
    assert [g.memory_bytes for g in node.gpus] == [0, H200.memory_bytes]
    assert [g.mig_enabled for g in node.gpus] == [False, False]


def test_the_h200_node_as_nvml_describes_it(tmp_path: Path) -> None:
    fake = h200_node()
    fake.write_node_files(tmp_path)
    node = NvmlBackend(sysfs_root=str(tmp_path), nvml=fake).discover()
    assert len(node.gpus) == 8 and len({g.uuid for g in node.gpus}) == 8
    assert node.gpus[0].uuid == H200_FIXTURE_UUID
    assert all(g.name == "NVIDIA H200" and g.compute_capability == "9.0" and not g.mig_enabled for g in node.gpus)
    assert [g.numa_node for g in node.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    uuids = [g.uuid for g in node.gpus]
    # Every GPU has 18 NVLinks to the NVSwitches: every pair counts 18.
    assert all(node.topology.links(a, b) == 18 for a in uuids for b in uuids if a != b)
    assert node.topology.pcie_level(uuids[0], uuids[3]) is PcieLevel.SAME_NUMA_NODE
    assert node.topology.pcie_level(uuids[0], uuids[4]) is PcieLevel.CROSS_CPU
    assert (node.driver_version, node.cuda_driver_version) == ("580.159.04", 13000)


@pytest.mark.skipif(not FIXTURE.exists(), reason="fixture not present")
def test_the_h200_node_answers_as_the_real_h200_did() -> None:
    """GPU 0 of the fake answers NVML's queries with what the fixture's real H200 returned."""
    real = json.loads(FIXTURE.read_text())
    device = real["devices"][0]
    fake = h200_node()
    fake.nvmlInit()
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    assert fake.nvmlSystemGetDriverVersion() == real["driver_version"]
    assert fake.nvmlSystemGetCudaDriverVersion() == real["cuda_driver_version"]
    for call in ("nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlDeviceGetMinorNumber",
                 "nvmlDeviceGetSupportedEventTypes", "nvmlDeviceGetMigMode"):
        answer = getattr(fake, call)(handle)
        assert (list(answer) if isinstance(answer, tuple) else answer) == device[call], call
    assert fake.nvmlDeviceGetMemoryInfo(handle).total == device["nvmlDeviceGetMemoryInfo"]["total"]
    assert list(fake.nvmlDeviceGetCudaComputeCapability(handle)) == device["nvmlDeviceGetCudaComputeCapability"]
    assert list(fake.nvmlDeviceGetRemappedRows(handle)) == device["nvmlDeviceGetRemappedRows"]
    for index, expected in device["gpu_instance_profiles"].items():
        try:
            info = fake.nvmlDeviceGetGpuInstanceProfileInfo(handle, int(index))
        except fake.NVMLError as exc:
            assert exc.value == expected.get("code"), index
            continue
        assert (info.id, info.sliceCount, info.instanceCount, info.memorySizeMB, info.multiprocessorCount) == (
            expected["id"], expected["sliceCount"], expected["instanceCount"], expected["memorySizeMB"],
            expected["multiprocessorCount"]), index


def test_pcie_levels_nvml_cannot_give_or_we_do_not_know_are_left_out(tmp_path: Path) -> None:
    fake = FakeNvml(plain_gpus(4), pcie_levels={frozenset(("GPU-0", "GPU-1")): 35})  # no such NVML level
    fake.fail("nvmlDeviceGetTopologyCommonAncestor", "NOT_SUPPORTED", gpu="GPU-2")
    topology = NvmlBackend(sysfs_root=str(tmp_path), nvml=fake).discover().topology
    assert topology.pcie_level("GPU-0", "GPU-1") is None
    assert topology.pcie_level("GPU-0", "GPU-2") is None and topology.pcie_level("GPU-2", "GPU-3") is None
    assert topology.pcie_level("GPU-0", "GPU-3") is PcieLevel.SAME_NUMA_NODE  # the fake's default level


def test_bindings_without_the_far_end_type_count_no_switch_links(tmp_path: Path) -> None:
    fake = h200_node(gpus=2)
    setattr(fake, "nvmlDeviceGetNvLinkRemoteDeviceType", None)  # older nvidia-ml-py: no such call  # noqa: B010
    node = NvmlBackend(sysfs_root=str(tmp_path), nvml=fake).discover()
    # Far end unknown and not a GPU of the node: the switch links cannot be credited.
    assert node.topology.links(node.gpus[0].uuid, node.gpus[1].uuid) == 0


def test_nvml_that_cannot_start_lists_the_paths_tried(tmp_path: Path) -> None:
    fake = FakeNvml(plain_gpus(1))
    fake.fail("nvmlInit", "DRIVER_NOT_LOADED")
    with pytest.raises(NvmlUnavailable) as caught:
        NvmlBackend(driver_root=str(tmp_path), nvml=fake)
    assert caught.value.searched == library_candidates(str(tmp_path))
    assert str(caught.value).startswith("could not load or initialise NVML (Driver Not Loaded); searched: ")


def test_the_library_under_the_driver_root_is_chosen_and_close_shuts_nvml_down(tmp_path: Path) -> None:
    library = tmp_path / "usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"")  # only looked for: the fake holds its library already
    fake = FakeNvml(plain_gpus(1))
    backend = NvmlBackend(driver_root=str(tmp_path), nvml=fake)
    assert backend.library == str(library) and fake.initialised == 1
    backend.close()
    backend.close()  # a second close: NVML answers UNINITIALIZED, which is ignored
    assert fake.initialised == 0


def test_the_example_in_docs_testing_runs(tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "docs" / "testing.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(code, namespace)  # the page's own example, as a user would run it
    example = namespace["test_my_node"]
    assert callable(example)
    example(tmp_path)
