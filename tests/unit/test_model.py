"""Device tree building, sharing, diff, simulated profiles and NVML helper functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvdp.backends.nvml.library import library_candidates
from nvdp.backends.nvml.sysfs import read_numa_node
from nvdp.backends.simulated.backend import SimulatedBackend, builtin_profiles, load_profile
from nvdp.config.load import load
from nvdp.config.options import Sharing, TimeSlicingResource
from nvdp.core.devices import Health, PcieLevel, Resource, diff
from nvdp.core.resources import build_tree, physical_id
from nvdp.errors import ConfigError, DiscoveryError
from nvdp.kubelet.server import socket_name

FIXTURE = Path(__file__).parents[2].parent / "shared" / "fixtures" / "nvidia-h200" / "nvml-snapshot.json"


def test_builtin_profiles() -> None:
    assert {"h200", "dgx-h100", "pcie-l40s"} <= set(builtin_profiles())


def test_dgx_h100_profile() -> None:
    node = SimulatedBackend("dgx-h100").discover()
    assert len(node.gpus) == 8
    assert [g.numa_node for g in node.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(g.name == "NVIDIA H100 80GB HBM3" and g.compute_capability == "9.0" for g in node.gpus)
    uuids = [g.uuid for g in node.gpus]
    assert len(set(uuids)) == 8
    assert all(node.topology.links(a, b) == 18 for a in uuids for b in uuids if a != b)


def test_pcie_l40s_profile() -> None:
    node = SimulatedBackend("pcie-l40s").discover()
    a, b, c, _ = (g.uuid for g in node.gpus)
    assert node.topology.nvlinks == {}
    assert node.topology.pcie_level(a, b) is PcieLevel.SINGLE_SWITCH
    assert node.topology.pcie_level(a, c) is PcieLevel.CROSS_CPU


@pytest.mark.skipif(not FIXTURE.exists(), reason="shared fixture not present")
def test_h200_profile_matches_the_real_node() -> None:
    real = json.loads(FIXTURE.read_text())["devices"][0]
    (gpu,) = SimulatedBackend("h200").discover().gpus
    assert gpu.uuid == real["nvmlDeviceGetUUID"]
    assert gpu.name == real["nvmlDeviceGetName"]
    assert gpu.minor == real["nvmlDeviceGetMinorNumber"]
    assert gpu.pci_bus_id == real["nvmlDeviceGetPciInfo"]["busId"]
    assert gpu.memory_bytes == real["nvmlDeviceGetMemoryInfo"]["total"]
    assert gpu.compute_capability == "{}.{}".format(*real["nvmlDeviceGetCudaComputeCapability"])


def test_profile_from_file_and_errors_name_the_field(tmp_path: Path) -> None:
    good = tmp_path / "mine.yaml"
    good.write_text("gpus:\n  - {count: 2, name: Test GPU, numa_node: 3}\n")
    label, profile = load_profile(str(good))
    assert label == "mine" and len(profile.gpus) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus:\n  - {count: 2, colour: red}\n")
    with pytest.raises(ConfigError, match=r"gpus\.0\.colour"):
        load_profile(str(bad))
    with pytest.raises(ConfigError, match="neither a built-in profile"):
        load_profile("no-such-profile")


def test_build_tree_full_gpus() -> None:
    node = SimulatedBackend("dgx-h100").discover()
    tree = build_tree(node, load({}, {}))
    (resource,) = tree.values()
    assert resource.name == "nvidia.com/gpu" and socket_name(resource.name) == "nvidia-gpu.sock"
    assert [d.id for d in resource.devices] == [g.uuid for g in node.gpus]
    assert resource.devices[5].paths == ("/dev/nvidia5",) and resource.devices[5].numa_node == 1
    assert all(d.health is Health.HEALTHY for d in resource.devices)


@pytest.mark.parametrize(
    ("rename", "expected_name"),
    [pytest.param(None, "nvidia.com/gpu", id="same name"),
     pytest.param("nvidia.com/gpu.shared", "nvidia.com/gpu.shared", id="renamed")],
)
def test_time_slicing_replicas(rename: str | None, expected_name: str) -> None:
    node = SimulatedBackend("pcie-l40s").discover()
    sharing = Sharing(resources=(TimeSlicingResource("nvidia.com/gpu", 3, rename),))
    tree = build_tree(node, load({}, {}).__class__(sharing=sharing))
    assert list(tree) == [expected_name]
    devices = tree[expected_name].devices
    assert len(devices) == 12
    assert devices[4].id == f"{node.gpus[1].uuid}::1" and devices[4].replica == 1
    assert physical_id(devices[4].id) == node.gpus[1].uuid
    assert socket_name(tree[expected_name].name) == f"nvidia-{expected_name.split('/')[1]}.sock"


def test_mig_enabled_gpu_is_a_full_gpu_with_strategy_none(tmp_path: Path) -> None:
    profile = tmp_path / "mig.yaml"
    profile.write_text("gpus:\n  - mig: {enabled: true, devices: [{gi_slices: 1, memory_mb: 9856}]}\n")
    node = SimulatedBackend(str(profile)).discover()
    assert len(build_tree(node, load({"mig_strategy": "none"}, {}))["nvidia.com/gpu"].devices) == 1


def test_diff() -> None:
    node = SimulatedBackend("pcie-l40s").discover()
    old = build_tree(node, load({}, {}))
    res = old["nvidia.com/gpu"]
    changed = Resource(res.name, (res.devices[0].with_health(Health.UNHEALTHY, "xid 79"), *res.devices[1:]))
    new = {res.name: changed, "nvidia.com/other": res}
    d = diff(old, new)
    assert (d.added, d.updated, d.removed) == (("nvidia.com/other",), ("nvidia.com/gpu",), ())
    assert diff(new, {}).removed == ("nvidia.com/gpu", "nvidia.com/other")
    assert diff(old, old).empty


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        pytest.param("/", ("libnvidia-ml.so.1",), id="root"),
        pytest.param("", ("libnvidia-ml.so.1",), id="empty"),
        pytest.param("/driver-root", (
            "/driver-root/usr/lib64/libnvidia-ml.so.1",
            "/driver-root/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
            "/driver-root/usr/lib/aarch64-linux-gnu/libnvidia-ml.so.1",
            "/driver-root/lib64/libnvidia-ml.so.1",
            "/driver-root/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
            "/driver-root/lib/aarch64-linux-gnu/libnvidia-ml.so.1",
            "libnvidia-ml.so.1",
        ), id="driver root"),
    ],
)
def test_library_search_order(root: str, expected: tuple[str, ...]) -> None:
    assert library_candidates(root) == expected


@pytest.mark.parametrize(
    ("content", "expected"),
    [pytest.param("1\n", 1, id="node 1"), pytest.param("-1\n", None, id="negative"),
     pytest.param(None, None, id="missing")],
)
def test_read_numa_node(tmp_path: Path, content: str | None, expected: int | None) -> None:
    if content is not None:
        folder = tmp_path / "bus/pci/devices/0000:3b:00.0"
        folder.mkdir(parents=True)
        (folder / "numa_node").write_text(content)
    assert read_numa_node("00000000:3B:00.0", str(tmp_path)) == expected


def test_read_numa_node_garbage_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "bus/pci/devices/0000:3b:00.0"
    folder.mkdir(parents=True)
    (folder / "numa_node").write_text("zero")
    with pytest.raises(DiscoveryError, match="numa_node"):
        read_numa_node("00000000:3B:00.0", str(tmp_path))
