"""The built-in simulated profiles, ready to serve: each one's expanded `Node` as plain JSON data.

`profiles/*.yaml` are the sources (docs/simulated-profiles.md). Reading one needs PyYAML and
the pydantic schema in `profile.py`, which cost more start-up time and memory than the rest of
the plugin's own code, so `profiles/<name>.json` holds what `<name>.yaml` expands to and
`--simulate NAME` reads only that (json is already loaded). The JSON files are generated (`make
profiles`, i.e. scripts/compile-profiles) and a test regenerates them and
checks they are up to date, so they cannot drift from the YAML. A profile given by path still goes
through the schema.

Loading checks the shape of every record (exact keys, value types) without pydantic: the file
is ours, so a mismatch means a damaged install, reported as a ConfigError naming the record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from nvdp.backends.simulated.checks import PCI_BUS_ID, first_clash
from nvdp.core.devices import FabricInfo, GpuInfo, MigInfo, Node, PcieLevel, Topology, VgpuInfo
from nvdp.errors import ConfigError

PROFILES_PACKAGE = "nvdp.backends.simulated.profiles"
# A plain path, not importlib.resources: that would load pathlib, tempfile and zipfile (~10 ms).
PROFILES_DIR = os.path.join(os.path.dirname(__file__), "profiles")
FORMAT = 1


def builtin_profiles() -> list[str]:
    """The names of the built-in profiles (their YAML sources)."""
    return sorted(name.removesuffix(".yaml") for name in os.listdir(PROFILES_DIR) if name.endswith(".yaml"))


# --- Node <-> plain data --------------------------------------------------------------------------

def node_to_data(node: Node) -> dict[str, Any]:
    """A JSON-ready form of a node; pairs are sorted so the text is stable."""

    def pairs(mapping: Mapping[frozenset[str], Any]) -> list[list[Any]]:
        rows = [[*sorted(k), v.name if isinstance(v, PcieLevel) else v] for k, v in mapping.items()]
        return sorted(rows)

    return {
        "gpus": [_gpu_data(g) for g in node.gpus],
        "nvlinks": pairs(node.topology.nvlinks),
        "pcie": pairs(node.topology.pcie),
        "driver_version": node.driver_version,
        "cuda_driver_version": node.cuda_driver_version,
        "control_devices": list(node.control_devices),
        "mig_minors": dict(node.mig_minors),
    }


def _gpu_data(gpu: GpuInfo) -> dict[str, Any]:
    data: dict[str, Any] = {f: getattr(gpu, f) for f in _GPU_FIELDS}
    # GPU feature discovery's facts (core/devices.py): plain records or None.
    data["fabric"] = None if gpu.fabric is None else {"cluster_uuid": gpu.fabric.cluster_uuid,
                                                       "clique_id": gpu.fabric.clique_id}
    data["vgpu"] = None if gpu.vgpu is None else {"host_driver_version": gpu.vgpu.host_driver_version,
                                                   "host_driver_branch": gpu.vgpu.host_driver_branch}
    data["mig_devices"] = [
        {f: list(v) if isinstance(v := getattr(m, f), tuple) else v for f in _MIG_FIELDS} for m in gpu.mig_devices
    ]
    return data


# Field -> accepted JSON types. The keys must match the dataclasses' fields (a test checks).
_MIG_FIELDS: dict[str, tuple[type, ...]] = {
    "slot": (int,), "uuid": (str,), "gi_id": (int,), "ci_id": (int,), "gi_slices": (int,),
    "ci_slices": (int,), "memory_mb": (int,), "attributes": (list,), "neg_attributes": (list,),
    "multiprocessors": (int,), "copy_engines": (int,), "decoders": (int,), "encoders": (int,),
    "jpegs": (int,), "ofas": (int,),
}
_GPU_FIELDS: dict[str, tuple[type, ...]] = {
    "index": (int,), "uuid": (str,), "minor": (int,), "name": (str,), "pci_bus_id": (str,),
    "memory_bytes": (int,), "compute_capability": (str,), "numa_node": (int, type(None)),
    "mig_enabled": (bool,), "mig_capable": (bool,), "pci_class": (int, type(None)),
}
_FABRIC_FIELDS: dict[str, tuple[type, ...]] = {"cluster_uuid": (str,), "clique_id": (int,)}
_VGPU_FIELDS: dict[str, tuple[type, ...]] = {"host_driver_version": (str,), "host_driver_branch": (str,)}
_NODE_FIELDS: dict[str, tuple[type, ...]] = {
    "gpus": (list,), "nvlinks": (list,), "pcie": (list,), "driver_version": (str,),
    "cuda_driver_version": (int,), "control_devices": (list,), "mig_minors": (dict,),
}


Fields = Mapping[str, tuple[type, ...]]


def _checked(data: Any, fields: Fields, where: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(data, dict) or set(data) != {*fields, *extra}:
        raise ValueError(f"{where}: expected the keys {sorted({*fields, *extra})}")
    for key, types in fields.items():
        if not isinstance(data[key], types) or (int in types and isinstance(data[key], bool) and bool not in types):
            raise ValueError(f"{where}.{key}: {data[key]!r} is not {' or '.join(t.__name__ for t in types)}")
    return data


def _strings(values: list[Any], where: str) -> tuple[str, ...]:
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: expected strings")
    return tuple(values)


def node_from_data(data: Any, where: str = "node") -> Node:
    """The inverse of `node_to_data`; ValueError names the first record that does not fit."""
    d = _checked(data, _NODE_FIELDS, where)
    gpus = []
    for i, g in enumerate(d["gpus"]):
        g = _checked(g, _GPU_FIELDS, f"{where}.gpus.{i}", extra=("mig_devices", "fabric", "vgpu"))
        fabric = None if g["fabric"] is None else FabricInfo(**_checked(g["fabric"], _FABRIC_FIELDS,
                                                                          f"{where}.gpus.{i}.fabric"))
        vgpu = None if g["vgpu"] is None else VgpuInfo(**_checked(g["vgpu"], _VGPU_FIELDS, f"{where}.gpus.{i}.vgpu"))
        migs = []
        for j, m in enumerate(g["mig_devices"]):
            m = _checked(m, _MIG_FIELDS, f"{where}.gpus.{i}.mig_devices.{j}")
            for key in ("attributes", "neg_attributes"):
                m = {**m, key: _strings(m[key], f"{where}.gpus.{i}.mig_devices.{j}.{key}")}
            migs.append(MigInfo(**m))
        if not PCI_BUS_ID.fullmatch(g["pci_bus_id"]):
            raise ValueError(f"{where}.gpus.{i}.pci_bus_id: {g['pci_bus_id']!r} is not a PCI bus id")
        gpus.append(GpuInfo(**{k: g[k] for k in _GPU_FIELDS}, mig_devices=tuple(migs), fabric=fabric, vgpu=vgpu))
    # The same checks as a YAML profile's (checks.py): the file is generated, but may be damaged.
    if clash := first_clash(gpus, [f"{where}.gpus.{i}" for i in range(len(gpus))]):
        raise ValueError(f"{clash[0]}: {clash[1]}")

    def pairs(rows: list[Any], key: str) -> dict[frozenset[str], Any]:
        out: dict[frozenset[str], Any] = {}
        for n, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == 3 and all(isinstance(x, str) for x in row[:2])):
                raise ValueError(f"{where}.{key}.{n}: expected [uuid, uuid, value]")
            a, b, value = row
            if key == "pcie":
                if not isinstance(value, str) or value not in PcieLevel.__members__:
                    raise ValueError(f"{where}.{key}.{n}: {value!r} is not a PCIe level")
                out[frozenset((a, b))] = PcieLevel[value]
            elif isinstance(value, int) and not isinstance(value, bool):
                out[frozenset((a, b))] = value
            else:
                raise ValueError(f"{where}.{key}.{n}: {value!r} is not a link count")
        return out

    minors = d["mig_minors"]
    if not all(isinstance(v, int) for v in minors.values()):
        raise ValueError(f"{where}.mig_minors: expected integers")
    return Node(
        gpus=tuple(gpus),
        topology=Topology(nvlinks=pairs(d["nvlinks"], "nvlinks"), pcie=pairs(d["pcie"], "pcie")),
        driver_version=d["driver_version"],
        cuda_driver_version=d["cuda_driver_version"],
        control_devices=_strings(d["control_devices"], f"{where}.control_devices"),
        mig_minors=dict(minors),
    )


# --- the compiled files ---------------------------------------------------------------------------

def compiled_name(name: str) -> str:
    return f"{name}.json"


_RECORD_FIELDS: dict[str, tuple[type, ...]] = {"format": (int,), "node": (dict,), "mig_minors_missing": (list,)}


def builtin_node(name: str, source: str = "--simulate") -> tuple[Node, tuple[str, ...]]:
    """A built-in profile's node and the mig-minors entries its simulated driver lacks. `source`
    is how the profile was given, for errors (`--simulate`, `NVDP_SIMULATE`, a config file)."""
    file = compiled_name(name)
    try:
        with open(os.path.join(PROFILES_DIR, file), encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(source, f"{file} is missing: reinstall nvdp or run `make profiles`") from None
    try:
        record = _checked(json.loads(text), _RECORD_FIELDS, name, extra=("generated_from",))
        if record["format"] != FORMAT:
            raise ValueError(f"format {record['format']}, expected {FORMAT}")
        node = node_from_data(record["node"], f"{name}.node")
        missing = _strings(record["mig_minors_missing"], f"{name}.mig_minors_missing")
    except ValueError as exc:  # json.JSONDecodeError is one too
        raise ConfigError(source, f"{file} is damaged ({exc}): reinstall nvdp or run `make profiles`") from exc
    return node, missing
