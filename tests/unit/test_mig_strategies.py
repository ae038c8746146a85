"""MIG strategies, capability device nodes and simulated MIG layouts (pure: no servers)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.backends.simulated.expand import simulated_mig_minors
from nvdp.config.load import load
from nvdp.core import mig
from nvdp.core.devices import GpuInfo, MigInfo
from nvdp.core.resources import build_tree, plan_tree
from nvdp.errors import ConfigError, MigConfigError


def tree_of(profile: str, **cli: str) -> dict[str, list[str]]:
    node = SimulatedBackend(profile).discover()
    return {name: [d.id for d in r.devices] for name, r in build_tree(node, load(cli, {})).items()}


# --- mig-minors and capability nodes -------------------------------------------------------------

MINORS_TEXT = """config 1
monitor 2
gpu0/gi0/access 3
gpu0/gi0/ci0/access 4
gpu0/gi1/access 12
gpu0/gi1/ci0/access 13
gpu12/gi14/ci7/access 1622
something unexpected
"""


def test_parse_mig_minors() -> None:
    minors, bad = mig.parse_mig_minors(MINORS_TEXT)
    assert minors == {
        "config": 1, "monitor": 2, "gpu0/gi0/access": 3, "gpu0/gi0/ci0/access": 4,
        "gpu0/gi1/access": 12, "gpu0/gi1/ci0/access": 13, "gpu12/gi14/ci7/access": 1622,
    }
    assert bad == ["something unexpected"]


def test_simulated_mig_minors_follow_the_driver_layout() -> None:
    node = SimulatedBackend("h100-mig-single").discover()
    # The driver's numbering: config 1, monitor 2, then 15 GIs x (1 + 8 CIs) per GPU minor.
    assert node.mig_minors["config"] == 1 and node.mig_minors["monitor"] == 2
    assert node.mig_minors["gpu0/gi0/access"] == 3 and node.mig_minors["gpu0/gi0/ci7/access"] == 11
    assert node.mig_minors["gpu0/gi1/access"] == 12 and node.mig_minors["gpu1/gi0/access"] == 138
    assert len(node.mig_minors) == 2 + 8 * 15 * 9
    assert simulated_mig_minors(SimulatedBackend("dgx-h100").discover().gpus) == {}


@pytest.mark.parametrize(
    ("minors", "paths", "missing"),
    [
        pytest.param({"gpu3/gi5/access": 40, "gpu3/gi5/ci1/access": 42}, ["/dev/nvidia-caps/nvidia-cap40",
                     "/dev/nvidia-caps/nvidia-cap42"], [], id="both present"),
        pytest.param({"gpu3/gi5/ci1/access": 42}, ["/dev/nvidia-caps/nvidia-cap42"], ["gpu3/gi5/access"],
                     id="GI entry missing"),
        pytest.param({}, [], ["gpu3/gi5/access", "gpu3/gi5/ci1/access"], id="no mig-minors file"),
    ],
)
def test_capability_paths_use_the_parent_minor(minors: dict[str, int], paths: list[str], missing: list[str]) -> None:
    gpu = GpuInfo(index=1, uuid="GPU-1", minor=3, name="x", pci_bus_id="b", memory_bytes=2**34,
                  compute_capability="9.0", mig_enabled=True)
    m = MigInfo(slot=2, uuid="MIG-1", gi_id=5, ci_id=1, gi_slices=2, ci_slices=2, memory_mb=9856)
    assert mig.capability_paths(gpu, m, minors) == (paths, missing)
    device = mig.mig_device(gpu, m, minors, require_caps=True)
    assert device.paths == ("/dev/nvidia3", *paths) and device.index == "1:2" and device.gpu_uuid == "GPU-1"
    assert device.mig == m
    assert device.healthy is (not missing)
    assert mig.mig_device(gpu, m, minors, require_caps=False).healthy


# --- strategies ----------------------------------------------------------------------------------


def test_single_checks_run_in_the_official_order() -> None:
    # Both an empty MIG GPU and mixed MIG modes: the empty GPU is reported first, as upstream.
    backend = SimulatedBackend("h100-mig-single")
    backend.set_mig_layout(2, [])
    backend.set_mig_layout(5, enabled=False)
    with pytest.raises(MigConfigError, match="device 2 has no MIG devices configured"):
        build_tree(backend.discover(), load({"mig_strategy": "single"}, {}))
    backend.set_mig_layout(2, ["1g.10gb"])
    with pytest.raises(MigConfigError, match=r"same migEnabled value \(MIG is disabled on GPU 5\)"):
        build_tree(backend.discover(), load({"mig_strategy": "single"}, {}))


def test_single_type_compares_nvml_attributes_not_only_names() -> None:
    # Same profile name, different memory: another device type for `single` (as upstream compares
    # the whole nvmlDeviceAttributes_t).
    node = SimulatedBackend("h100-mig-single").discover()
    gpu = node.gpus[0]
    odd = replace(gpu.mig_devices[0], memory_mb=gpu.mig_devices[0].memory_mb - 128)
    gpus = (replace(gpu, mig_devices=(odd, *gpu.mig_devices[1:])), *node.gpus[1:])
    assert str(mig.profile_of(gpu, odd)) == "1g.10gb"
    with pytest.raises(MigConfigError, match="more than one MIG device type"):
        build_tree(replace(node, gpus=gpus), load({"mig_strategy": "single"}, {}))


def test_mixed_reports_skipped_and_empty() -> None:
    backend = SimulatedBackend("a100-mig-mixed")
    backend.set_mig_layout(1, ["1c.3g.20gb", "2c.3g.20gb"])
    plan = plan_tree(backend.discover(), load({"mig_strategy": "mixed"}, {}))
    assert [(p.level, p.device) for p in plan.problems] == [
        ("error", backend.node.gpus[1].mig_devices[0].uuid),
        ("error", backend.node.gpus[1].mig_devices[1].uuid),
        ("warning", ""),
    ]
    assert "1c.3g.20gb cannot be exposed" in plan.problems[0].message
    assert "GPU 7 has MIG enabled but no MIG devices" in plan.problems[2].message
    assert len(plan.tree["nvidia.com/mig-1g.5gb"].devices) == 17
    assert not any(n.startswith("nvidia.com/mig-1c") or n.startswith("nvidia.com/mig-2c") for n in plan.tree)


def test_none_ignores_mig_devices() -> None:
    tree = tree_of("a100-mig-mixed", mig_strategy="none")
    node = SimulatedBackend("a100-mig-mixed").discover()
    assert tree == {"nvidia.com/gpu": [g.uuid for g in node.gpus]}


def test_time_slicing_a_mig_resource() -> None:
    from nvdp.config.options import Sharing, TimeSlicingResource

    node = SimulatedBackend("h200-mig").discover()
    sharing = Sharing(resources=(TimeSlicingResource("nvidia.com/mig-3g.71gb", 2),))
    tree = build_tree(node, replace(load({"mig_strategy": "mixed"}, {}), sharing=sharing))
    uuid = node.gpus[0].mig_devices[0].uuid
    assert [d.id for d in tree["nvidia.com/mig-3g.71gb"].devices] == [f"{uuid}::0", f"{uuid}::1"]


def test_describe_layout() -> None:
    node = SimulatedBackend("a100-mig-mixed").discover()
    assert mig.describe_layout(node.gpus[2:]) == (
        "2:7x1g.5gb 3:3g.20gb+2g.10gb+1g.5gb 4:3g.20gb+2g.10gb+1g.5gb 5:3g.20gb+2g.10gb+1g.5gb 6:off 7:empty"
    )


# --- simulated layouts ---------------------------------------------------------------------------


def test_profile_names_resolve_against_the_model_table() -> None:
    (gpu,) = SimulatedBackend("h200-mig").discover().gpus
    plus_me = gpu.mig_devices[2]
    assert (plus_me.gi_slices, plus_me.memory_mb, plus_me.attributes, plus_me.ofas) == (1, 16384, ("me",), 1)
    assert [m.slot for m in gpu.mig_devices] == [0, 1, 2, 3]
    assert [m.gi_id for m in gpu.mig_devices] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        pytest.param(["9g.99gb"], r"unknown MIG profile '9g.99gb' for NVIDIA A100-SXM4-40GB \(known: 1g.5gb, ",
                     id="unknown profile"),
        pytest.param(["4c.3g.20gb"], "a compute instance of 4 slices does not fit 3g.20gb", id="CI too big"),
        pytest.param([{"gi_slices": 2}], "give a profile name", id="neither profile nor facts"),
        pytest.param([{"profile": "1g.5gb", "slot": 3}, {"profile": "1g.5gb", "slot": 3}], "duplicate slots",
                     id="duplicate slots"),
        pytest.param([{"profile": "1g.5gb", "colour": "red"}], "colour", id="unknown field"),
    ],
)
def test_bad_layouts_name_the_field(devices: list[str | dict[str, object]], message: str) -> None:
    backend = SimulatedBackend("a100-mig-mixed")
    before = backend.node
    with pytest.raises(ConfigError, match=message):
        backend.set_mig_layout(0, devices)
    assert backend.node is before


def test_model_without_a_table_needs_facts(tmp_path: Path) -> None:
    profile = tmp_path / "l40s.yaml"
    profile.write_text("gpus:\n  - name: NVIDIA L40S\n    mig: {enabled: true, devices: [1g.10gb]}\n")
    with pytest.raises(ConfigError, match=r"gpus\.0\.mig\.devices\.0.*no MIG profile table for 'NVIDIA L40S'"):
        SimulatedBackend(str(profile))
    profile.write_text("gpus:\n  - name: NVIDIA L40S\n    mig: {enabled: true, devices: "
                       "[{gi_slices: 2, memory_mb: 20000, slot: 5, gi_id: 9, ci_id: 1}]}\n")
    (m,) = SimulatedBackend(str(profile)).discover().gpus[0].mig_devices
    assert (m.slot, m.gi_id, m.ci_id, m.ci_slices) == (5, 9, 1, 2)


def test_disabled_mig_with_devices_is_an_error() -> None:
    with pytest.raises(ConfigError, match="MIG devices need enabled: true"):
        SimulatedBackend("a100-mig-mixed").set_mig_layout(0, ["1g.5gb"], enabled=False)


def test_layout_change_keeps_other_devices_and_is_reproducible() -> None:
    backend = SimulatedBackend("a100-mig-mixed")
    first = backend.node
    backend.set_mig_layout(3, ["7g.40gb"])
    assert backend.node.gpus[:3] == first.gpus[:3] and backend.node.gpus[4:] == first.gpus[4:]
    (new,) = backend.node.gpus[3].mig_devices
    assert new.uuid not in {m.uuid for m in first.gpus[3].mig_devices}
    backend.set_mig_layout(3, ["3g.20gb", "2g.10gb", "1g.5gb"])
    assert backend.node == first  # recreating the same layout gives the same node


def test_gpu_by_index_or_uuid() -> None:
    backend = SimulatedBackend("a100-mig-mixed")
    with pytest.raises(ValueError, match="no GPU 8 on the simulated node"):
        backend.set_mig_layout(8, ["1g.5gb"])
    uuid = backend.node.gpus[6].uuid
    assert backend.set_mig_layout(uuid, ["7g.40gb"]).index == 6
    assert backend.node.gpus[6].mig_enabled


def test_rescan_interval_option() -> None:
    assert load({}, {}).mig_rescan_interval == 0
    assert load({}, {"NVDP_MIG_RESCAN_INTERVAL": "2.5"}).mig_rescan_interval == 2.5
    assert load({"mig_rescan_interval": "10"}, {"NVDP_MIG_RESCAN_INTERVAL": "2.5"}).mig_rescan_interval == 10
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(ConfigError, match="--mig-rescan-interval"):
            load({"mig_rescan_interval": bad}, {})


def test_file_key_for_rescan_interval(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("version: v1\nflags:\n  nvdp:\n    migRescanInterval: 30\n")
    assert load({"config_file": str(config)}, {}).mig_rescan_interval == 30


def test_node_equality_detects_layout_changes() -> None:
    node = SimulatedBackend("h200-mig").discover()
    assert node == SimulatedBackend("h200-mig").discover()
    gpu = node.gpus[0]
    assert replace(node, gpus=(replace(gpu, mig_devices=gpu.mig_devices[:-1]),)) != node
    assert replace(node, mig_minors={}) != node


# --- the control socket's mig-layout command -----------------------------------------------------


async def test_mig_layout_command() -> None:
    from nvdp.backends.simulated.control import ControlContext, handle

    backend = SimulatedBackend("a100-mig-mixed")
    rescans: list[bool] = []

    async def rescan() -> bool:
        rescans.append(True)
        return True

    async def ask(message: dict[str, object], with_rescan: bool = True) -> dict[str, object]:
        context = ControlContext(lambda: backend, lambda: None, rescan if with_rescan else None)
        return await handle(context, json.dumps(message).encode())

    reply = await ask({"command": "mig-layout", "gpu": 7, "devices": ["3g.20gb", "1c.2g.10gb"]})
    gpu = backend.node.gpus[7]
    assert reply == {"ok": True, "message": "GPU 7 MIG layout: 3g.20gb+1c.2g.10gb; the plugin serves it now",
                     "gpu": gpu.uuid, "applied": True}
    assert [m.ci_slices for m in gpu.mig_devices] == [3, 1] and rescans == [True]

    reply = await ask({"command": "mig-layout", "gpu": 0, "disable": True, "no_rescan": True})
    assert reply["message"] == "GPU 0 MIG layout: off (the plugin sees it on its next rescan or SIGHUP)"
    assert not backend.node.gpus[0].mig_enabled and rescans == [True]

    assert (await ask({"command": "mig-layout", "gpu": 1}, with_rescan=False))["message"] == (
        "GPU 1 MIG layout: empty (the plugin sees it on its next rescan or SIGHUP)"
    )


@pytest.mark.parametrize(
    ("message", "error"),
    [
        pytest.param({"gpu": 0, "devices": "1g.5gb"}, "field 'devices' must be a list", id="devices not a list"),
        pytest.param({"gpu": 0, "devices": ["1g.5gb"], "disable": True}, "not both", id="disable with devices"),
        pytest.param({"gpu": 0, "devices": ["5g.30gb"]}, "unknown MIG profile '5g.30gb'", id="unknown profile"),
        pytest.param({"gpu": 9, "devices": []}, "no GPU 9 on the simulated node", id="no such GPU"),
    ],
)
async def test_mig_layout_command_errors(message: dict[str, object], error: str) -> None:
    from nvdp.backends.simulated.control import ControlContext, handle

    backend = SimulatedBackend("a100-mig-mixed")
    before = backend.node
    reply = await handle(ControlContext(lambda: backend, lambda: None),
                         json.dumps({"command": "mig-layout", **message}).encode())
    assert reply["ok"] is False and error in str(reply["error"])
    assert backend.node is before
