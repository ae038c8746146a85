"""Per-GPU sharing: `devices` selects what is shared, `rename` where it is served (core/sharing.py).

Every `devices` form (all, a count, GPU indexes as numbers and as text, GPU UUIDs, MIG indexes,
MIG UUIDs, legacy MIG-GPU names), every node-dependent error (naming the entry), health fan-out
to every replica and GetPreferredAllocation per resource, all on simulated nodes.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest

from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.core.allocation import preferred
from nvdp.core.devices import DeviceTree, Health, Node
from nvdp.core.health import EventKind, HealthEvent, HealthState, XidFilter, apply_event, overlay
from nvdp.core.resources import plan_tree
from nvdp.errors import ConfigError

GPU = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"


@cache
def node(profile: str) -> Node:
    return SimulatedBackend(profile).discover()


def config(sharing: str, **cli: Any) -> Config:
    return load({"config_file": "/c.yaml", **cli}, {}, lambda _: f"version: v1\nsharing:\n{sharing}")


def time_slicing(*entries: str, rename_by_default: bool = False, **cli: Any) -> Config:
    body = "".join(f"    - {e}\n" for e in entries)
    flag = str(rename_by_default).lower()
    return config(f"  timeSlicing:\n    renameByDefault: {flag}\n    resources:\n{body}", **cli)


def tree(cfg: Config, profile: str = "dgx-h100") -> DeviceTree:
    return plan_tree(node(profile), cfg).tree


def ids(t: DeviceTree, name: str) -> list[str]:
    return [d.id for d in t[name].devices]


def test_the_issue_example_two_of_eight_gpus_shared_under_their_own_name() -> None:
    uuids = [g.uuid for g in node("dgx-h100").gpus]
    t = tree(time_slicing(f"{{name: {GPU}, replicas: 4, devices: [6, 7], rename: {SHARED}}}"))
    assert list(t) == [GPU, SHARED]
    assert ids(t, GPU) == uuids[:6]
    assert ids(t, SHARED) == [f"{u}::{n}" for u in uuids[6:] for n in range(4)]
    assert all(d.replica == n % 4 for n, d in enumerate(t[SHARED].devices))


def _uuids(*indexes: int) -> list[str]:
    gpus = node("dgx-h100").gpus
    return [gpus[i].uuid for i in indexes]


@pytest.mark.parametrize(
    ("devices", "shared"),
    [
        pytest.param("all", list(range(8)), id="all"),
        pytest.param("2", [0, 1], id="count: the first N"),
        pytest.param("[6, 7]", [6, 7], id="indexes"),
        pytest.param("['7', '6']", [6, 7], id="indexes as text, served in the node's order"),
        pytest.param("[3, 3]", [3], id="a repeated index counts once"),
        pytest.param("[{u}]", [5], id="GPU UUID"),
        pytest.param("[1, {u}]", [1, 5], id="index and UUID"),
    ],
)
def test_every_gpu_devices_form(devices: str, shared: list[int]) -> None:
    u5 = _uuids(5)[0]
    t = tree(time_slicing(f"{{name: {GPU}, replicas: 2, devices: {devices.format(u=u5)}, rename: {SHARED}}}"))
    assert ids(t, SHARED) == [f"{u}::{n}" for u in _uuids(*shared) for n in range(2)]
    exclusive = [i for i in range(8) if i not in shared]
    assert ids(t, GPU) == _uuids(*exclusive) if exclusive else GPU not in t


def test_without_rename_the_selected_gpus_become_replicas_in_place() -> None:
    t = tree(time_slicing(f"{{name: {GPU}, replicas: 2, devices: [1]}}"))
    u = _uuids(0, 1, 2)
    assert ids(t, GPU)[:4] == [u[0], f"{u[1]}::0", f"{u[1]}::1", u[2]]
    assert len(t[GPU].devices) == 9


def test_disjoint_entries_give_gpus_different_replica_counts() -> None:
    t = tree(time_slicing(f"{{name: {GPU}, replicas: 2, devices: [0, 1], rename: nvidia.com/gpu.half}}",
                          f"{{name: {GPU}, replicas: 4, devices: [2, 3], rename: nvidia.com/gpu.quarter}}"))
    assert {name: len(r.devices) for name, r in t.items()} == {GPU: 4, "nvidia.com/gpu.half": 4,
                                                               "nvidia.com/gpu.quarter": 8}


def test_rename_by_default_with_a_selection() -> None:
    t = tree(time_slicing(f"{{name: {GPU}, replicas: 3, devices: [0]}}", rename_by_default=True))
    assert {name: len(r.devices) for name, r in t.items()} == {GPU: 7, SHARED: 3}


MIG = "a100-mig-mixed"  # GPUs 0-2: 7 x 1g.5gb; 3-5: 3g.20gb + 2g.10gb + 1g.5gb; 6 full; 7 empty


def _mig_device(gpu: int, slot: int) -> Any:
    return next(m for m in node(MIG).gpus[gpu].mig_devices if m.slot == slot)


@pytest.mark.parametrize(
    ("devices", "shared"),
    [
        pytest.param("['0:0', '1:3']", [(0, 0), (1, 3)], id="MIG indexes"),
        pytest.param("[{mig}]", [(2, 6)], id="MIG UUID"),
        pytest.param("[{legacy}]", [(2, 6)], id="MIG-GPU-<uuid>/<gi>/<ci>"),
        pytest.param("1", [(0, 0)], id="count"),
    ],
)
def test_every_mig_devices_form(devices: str, shared: list[tuple[int, int]]) -> None:
    m = _mig_device(2, 6)
    legacy = f"MIG-{node(MIG).gpus[2].uuid}/{m.gi_id}/{m.ci_id}"
    text = devices.format(mig=m.uuid, legacy=legacy)
    t = tree(time_slicing(f"{{name: mig-1g.5gb, replicas: 2, devices: {text}, rename: mig-1g.5gb.shared}}",
                          mig_strategy="mixed"), MIG)
    wanted = [_mig_device(g, s).uuid for g, s in shared]
    assert ids(t, "nvidia.com/mig-1g.5gb.shared") == [f"{u}::{n}" for u in wanted for n in range(2)]
    assert len(t["nvidia.com/mig-1g.5gb"].devices) == 24 - len(wanted)


def test_resource_absent_from_the_node_is_skipped_with_devices_all() -> None:
    t = tree(time_slicing("{name: mig-1g.10gb, replicas: 2}"))
    assert list(t) == [GPU]  # one config file serves many nodes


@pytest.mark.parametrize(
    ("entries", "field", "message"),
    [
        pytest.param([f"{{name: {GPU}, replicas: 2, devices: [0, 1], rename: nvidia.com/a}}",
                      f"{{name: {GPU}, replicas: 2, devices: [1, 2], rename: nvidia.com/b}}"],
                     "resources.1.devices", "is already shared by sharing.timeSlicing.resources.0", id="overlap"),
        pytest.param([f"{{name: {GPU}, replicas: 2}}", f"{{name: {GPU}, replicas: 4, rename: nvidia.com/b}}"],
                     "resources.1.devices", "GPU 0 (GPU-", id="two entries sharing every GPU"),
        pytest.param([f"{{name: {GPU}, replicas: 2, devices: [8]}}"], "resources.0.devices",
                     "no matching device at index: 8", id="index not on the node"),
        pytest.param([f"{{name: {GPU}, replicas: 2, devices: ['0:1']}}"], "resources.0.devices",
                     "no matching device at index: 0:1", id="MIG index not on the node"),
        pytest.param([f"{{name: {GPU}, replicas: 2, devices: [GPU-00000000-0000-0000-0000-000000000000]}}"],
                     "resources.0.devices", "no matching device with UUID: GPU-00000000", id="UUID not on the node"),
        pytest.param([f"{{name: {GPU}, replicas: 2, devices: 9}}"], "resources.0.devices",
                     "requested 9 devices to be replicated, but only 8 devices available", id="count too large"),
        pytest.param([f"{{name: {GPU}, replicas: 2, devices: []}}"], "resources.0.devices",
                     "selects no device", id="empty list"),
        pytest.param([f"{{name: {GPU}, replicas: 2, devices: [0], rename: {GPU}.x}}",
                      f"{{name: {GPU}.x, replicas: 2, devices: [0]}}"], "resources.1.devices",
                     "0 is on this node but is not a device of nvidia.com/gpu.x",
                     id="a list for a resource that is not on the node"),
        pytest.param([f"{{name: {GPU}, replicas: 2, devices: [0], rename: nvidia.com/a}}",
                      "{name: mig-1g.10gb, replicas: 2, devices: 1}"], "resources.1.devices",
                     "but only 0 devices available", id="a count for a resource that is not on the node"),
        pytest.param([f"{{name: {GPU}, replicas: 2, devices: [0], rename: nvidia.com/a}}",
                      f"{{name: {GPU}, replicas: 2, devices: [1], rename: nvidia.com/a}}"],
                     None, None, id="(allowed) two entries of one resource into one name"),
    ],
)
def test_node_dependent_errors_name_the_entry(entries: list[str], field: str | None, message: str | None) -> None:
    cfg = time_slicing(*entries)
    if field is None:
        assert len(tree(cfg)["nvidia.com/a"].devices) == 4
        return
    with pytest.raises(ConfigError) as info:
        tree(cfg)
    assert f"invalid sharing.timeSlicing.{field} in /c.yaml: " in str(info.value)
    assert message is not None and message in str(info.value)


def test_rename_colliding_with_an_existing_resource() -> None:
    cfg = load({"config_file": "/c.yaml", "mig_strategy": "mixed"}, {},
               lambda _: "sharing:\n  timeSlicing:\n    resources:\n"
                         "    - {name: mig-1g.5gb, replicas: 2, rename: mig-3g.20gb}\n")
    with pytest.raises(ConfigError, match=r"resources\.0\.rename in /c\.yaml: "
                                          r"nvidia.com/mig-3g.20gb is already a resource"):
        plan_tree(node(MIG), cfg)


def test_rename_colliding_with_another_entrys_resource() -> None:
    cfg = load({"config_file": "/c.yaml", "mig_strategy": "mixed"}, {},
               lambda _: "sharing:\n  timeSlicing:\n    resources:\n"
                         "    - {name: mig-1g.5gb, replicas: 2, rename: shared}\n"
                         "    - {name: mig-2g.10gb, replicas: 2, rename: shared}\n")
    with pytest.raises(ConfigError, match=r"resources\.1\.rename in /c\.yaml: nvidia.com/shared is already served by "
                                          r"sharing.timeSlicing.resources.0"):
        plan_tree(node(MIG), cfg)


def test_a_gpu_on_the_node_but_in_another_resource() -> None:
    cfg = load({"config_file": "/c.yaml", "mig_strategy": "mixed"}, {},
               lambda _: "sharing:\n  timeSlicing:\n    resources:\n    - {name: gpu, replicas: 2, devices: [0]}\n")
    with pytest.raises(ConfigError, match=r"0 is on this node but is not a device of nvidia\.com/gpu"):
        plan_tree(node(MIG), cfg)  # GPU 0 is MIG-enabled: its MIG devices are served, not the GPU


def test_differences_from_the_official_plugin_are_warned_about() -> None:
    def notes(cfg: Config) -> list[str]:
        return [p.message for p in plan_tree(node("dgx-h100"), cfg).problems]

    assert notes(time_slicing(f"{{name: {GPU}, replicas: 2}}", rename_by_default=True)) == []
    assert notes(time_slicing(f"{{name: {GPU}, replicas: 2, devices: all}}")) == []
    (note,) = notes(time_slicing(f"{{name: {GPU}, replicas: 4, devices: [6, 7], rename: {SHARED}}}"))
    assert note.startswith("sharing.timeSlicing.resources.0: nvdp honours devices=[6, 7] and "
                           f"rename={SHARED}; the official plugin ignores them and would share every device of "
                           f"{GPU} as {GPU}")
    (note,) = notes(time_slicing(f"{{name: {GPU}, replicas: 2, rename: x}}", rename_by_default=True))
    assert "rename=nvidia.com/x" in note and f"as {SHARED}" in note


def test_a_fault_on_a_gpu_covers_every_replica_of_it_and_nothing_else() -> None:
    t = tree(time_slicing(f"{{name: {GPU}, replicas: 4, devices: [6, 7], rename: {SHARED}}}"))
    gpu6 = _uuids(6)[0]
    state = apply_event(HealthState(), HealthEvent(gpu6, EventKind.XID, xid=79), XidFilter(), now=0.0)
    marked = overlay(t, state)
    unhealthy = {name: [d.id for d in r.devices if d.health is Health.UNHEALTHY] for name, r in marked.items()}
    assert unhealthy == {GPU: [], SHARED: [f"{gpu6}::{n}" for n in range(4)]}


def test_preferred_allocation_is_per_resource() -> None:
    n = node("dgx-h100")
    t = tree(time_slicing(f"{{name: {GPU}, replicas: 4, devices: [6, 7], rename: {SHARED}}}"))
    exclusive, shared = t[GPU], t[SHARED]
    two = preferred(exclusive, ids(t, GPU), [], 2, n.topology, "distributed")
    assert len(two) == 2 and set(two) <= set(ids(t, GPU))
    spread = preferred(shared, ids(t, SHARED), [], 2, n.topology, "distributed")
    assert {i.split("::")[0] for i in spread} == set(_uuids(6, 7))  # one replica of each GPU
    packed = preferred(shared, ids(t, SHARED), [], 2, n.topology, "packed")
    assert len({i.split("::")[0] for i in packed}) == 1
