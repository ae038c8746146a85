"""The precompiled built-in profiles (profiles/<name>.json) are what their YAML sources expand to."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path

import pytest

from nvdp.backends.simulated import builtin
from nvdp.backends.simulated.backend import SimulatedBackend, load_profile
from nvdp.backends.simulated.expand import build_node
from nvdp.backends.simulated.precompile import compiled_texts
from nvdp.core.devices import FabricInfo, GpuInfo, MigInfo, Node, VgpuInfo
from nvdp.errors import ConfigError

FOLDER = Path(str(resources.files(builtin.PROFILES_PACKAGE)))


def test_committed_json_is_what_the_yaml_compiles_to() -> None:
    fresh = compiled_texts()
    committed = {p.name: p.read_text() for p in FOLDER.glob("*.json")}
    assert set(committed) == set(fresh), "a built-in profile was added or removed: run `make profiles`"
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} is stale: run `make profiles`"


@pytest.mark.parametrize("name", builtin.builtin_profiles())
def test_served_node_equals_the_yaml_expansion(name: str) -> None:
    label, profile = load_profile(name)
    backend = SimulatedBackend(name)
    assert backend.discover() == build_node(label, profile)
    assert backend.profile_name == name


@pytest.mark.parametrize("name", ["dgx-h100", "h200-mig", "pcie-l40s"])
def test_data_round_trip(name: str) -> None:
    node = SimulatedBackend(name).discover()
    again = builtin.node_from_data(json.loads(json.dumps(builtin.node_to_data(node))))
    assert again == node


def test_field_tables_follow_the_dataclasses() -> None:
    assert set(builtin._MIG_FIELDS) == {f.name for f in dataclasses.fields(MigInfo)}
    assert {*builtin._GPU_FIELDS, "mig_devices", "fabric", "vgpu"} == {f.name for f in dataclasses.fields(GpuInfo)}
    assert set(builtin._FABRIC_FIELDS) == {f.name for f in dataclasses.fields(FabricInfo)}
    assert set(builtin._VGPU_FIELDS) == {f.name for f in dataclasses.fields(VgpuInfo)}
    node_fields = {f.name for f in dataclasses.fields(Node)} - {"topology"} | {"nvlinks", "pcie"}
    assert set(builtin._NODE_FIELDS) == node_fields


@pytest.mark.parametrize(
    ("damage", "where"),
    [
        pytest.param(lambda d: d.pop("driver_version"), r"node: expected the keys", id="missing key"),
        pytest.param(lambda d: d.update(colour="red"), r"node: expected the keys", id="unknown key"),
        pytest.param(lambda d: d["gpus"][0].update(minor="0"), r"node\.gpus\.0\.minor", id="wrong type"),
        pytest.param(lambda d: d["gpus"][0].update(index=True), r"node\.gpus\.0\.index", id="bool for int"),
        pytest.param(lambda d: d["pcie"][0].__setitem__(2, 7), r"node\.pcie\.0", id="bad pair"),
        pytest.param(lambda d: d["control_devices"].append(3), r"node\.control_devices", id="not a string"),
        pytest.param(lambda d: d["gpus"][1].update(uuid=d["gpus"][0]["uuid"]),
                     r"node\.gpus\.1\.uuid: '.*' is also the uuid of node\.gpus\.0", id="same uuid"),
        pytest.param(lambda d: d["gpus"][2].update(pci_bus_id=d["gpus"][0]["pci_bus_id"].lower()),
                     r"node\.gpus\.2\.pci_bus_id: .* is also the pci_bus_id of node\.gpus\.0", id="same bus id"),
        pytest.param(lambda d: d["gpus"][3].update(pci_bus_id="00000000:108:00.0"),
                     r"node\.gpus\.3\.pci_bus_id: '00000000:108:00\.0' is not a PCI bus id", id="bad bus id"),
    ],
)
def test_damaged_data_names_the_record(damage: object, where: str) -> None:
    data = builtin.node_to_data(SimulatedBackend("dgx-h100").discover())
    damage(data)  # type: ignore[operator]
    with pytest.raises(ValueError, match=where):
        builtin.node_from_data(data)


def test_unknown_level_name_is_refused() -> None:
    data = builtin.node_to_data(SimulatedBackend("pcie-l40s").discover())
    data["pcie"][0][2] = "NEXT_DOOR"
    with pytest.raises(ValueError, match=r"node\.pcie\.0: 'NEXT_DOOR' is not a PCIe level"):
        builtin.node_from_data(data)


def test_a_mig_uuid_that_repeats_a_gpu_uuid_is_refused() -> None:
    data = builtin.node_to_data(SimulatedBackend("h200-mig").discover())
    data["gpus"][0]["mig_devices"][1]["uuid"] = data["gpus"][0]["uuid"]
    with pytest.raises(ValueError, match=r"node\.gpus\.0\.mig\.devices\.1\.uuid: .* is also the uuid of node\.gpus\.0"):
        builtin.node_from_data(data)


def test_a_missing_compiled_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"no-such\.json is missing"):
        builtin.builtin_node("no-such")


def test_errors_name_how_the_profile_was_given() -> None:
    with pytest.raises(ConfigError, match=r"^invalid NVDP_SIMULATE: no-such\.json is missing"):
        builtin.builtin_node("no-such", "NVDP_SIMULATE")
