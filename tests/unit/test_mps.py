"""MPS rules and answers (no process started): the config block, the official errors, what each
control daemon is told, and the Allocate answer, field by field as upstream-behaviour.md gives it."""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

import pytest

from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.core import mps
from nvdp.core.container import ContainerEdits, DeviceSpec, Mount, edits_for
from nvdp.core.devices import DeviceTree, Node
from nvdp.core.resources import plan_tree
from nvdp.errors import AllocationError, ConfigError

GPU = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"
ROOT = "/run/nvidia/mps"


@cache
def node(profile: str) -> Node:
    return SimulatedBackend(profile).discover()


def mps_config(entries: str = f"{{name: {GPU}, replicas: 4}}", block: str = "", **cli: Any) -> Config:
    text = f"version: v1\nsharing:\n  mps:\n{block}    resources:\n    - {entries}\n"
    return load({"config_file": "/c.yaml", "mps_root": ROOT, **cli}, {}, lambda _: text)


def tree(cfg: Config, profile: str = "dgx-h100") -> DeviceTree:
    return plan_tree(node(profile), cfg).tree


# --- the config block ----------------------------------------------------------------------------


def test_mps_block_has_the_time_slicing_shape_and_forces_fail_requests_greater_than_one() -> None:
    cfg = mps_config()
    assert cfg.sharing.strategy == "mps" and cfg.sharing.fail_requests_greater_than_one is True
    (entry,) = cfg.sharing.resources
    assert (entry.name, entry.replicas, entry.rename, entry.devices, entry.where) == (
        GPU, 4, None, "all", "sharing.mps.resources.0")


def test_an_explicit_false_is_kept() -> None:
    cfg = mps_config(block="    failRequestsGreaterThanOne: false\n")
    assert cfg.sharing.fail_requests_greater_than_one is False


def test_rename_by_default() -> None:
    (entry,) = mps_config(block="    renameByDefault: true\n").sharing.resources
    assert entry.target == SHARED


def test_mps_wins_over_time_slicing(caplog: pytest.LogCaptureFixture) -> None:
    text = (f"sharing:\n  timeSlicing:\n    resources: [{{name: {GPU}, replicas: 8}}]\n"
            f"  mps:\n    resources: [{{name: {GPU}, replicas: 2}}]\n")
    with caplog.at_level(logging.WARNING, "nvdp.configfile"):
        cfg = load({"config_file": "/c.yaml", "mps_root": ROOT}, {}, lambda _: text)
    assert cfg.sharing.strategy == "mps" and cfg.sharing.resources[0].replicas == 2
    assert "sharing.timeSlicing is ignored" in caplog.text


@pytest.mark.parametrize(
    ("text", "cli", "field", "message"),
    [
        pytest.param(f"{{name: {GPU}, replicas: 1}}", {}, "sharing.mps.resources.0.replicas in /c.yaml",
                     "number of replicas must be >= 2; found 1", id="one replica"),
        pytest.param(f"{{name: {GPU}}}", {}, "sharing.mps.resources.0.replicas in /c.yaml",
                     "no replicas specified", id="no replicas"),
        pytest.param(f"{{name: {GPU}, replicas: 2}}", {"mig_strategy": "mixed"}, "--mig-strategy",
                     "using --mig-strategy=mixed is not supported with MPS", id="mixed MIG strategy"),
        pytest.param(f"{{name: {GPU}, replicas: 2}}", {"mps_root": ""}, "--mps-root",
                     "using MPS requires --mps-root to be specified", id="no mps root"),
    ],
)
def test_config_errors(text: str, cli: dict[str, str], field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        mps_config(text, **cli)
    assert str(info.value) == f"invalid {field}: {message}"


def test_empty_mps_block() -> None:
    with pytest.raises(ConfigError, match=r"sharing\.mps\.resources in /c\.yaml: no resources specified"):
        load({"config_file": "/c.yaml", "mps_root": ROOT}, {}, lambda _: "sharing: {mps: {}}\n")


def test_the_daemon_needs_no_mps_root() -> None:
    text = f"sharing:\n  mps:\n    resources: [{{name: {GPU}, replicas: 2}}]\n"
    cfg = load({"config_file": "/c.yaml"}, {}, lambda _: text, require_mps_root=False)
    assert cfg.sharing.strategy == "mps" and cfg.mps_root == ""


# --- the rules that need the node ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("capability", "clients"),
    [("7.5", 48), ("8.0", 48), ("9.0", 48), ("10.0", 48), ("7.0", 16), ("6.1", 16), ("7", 16), ("bad", 16)],
)
def test_client_limit_by_compute_capability(capability: str, clients: int) -> None:
    assert mps.max_clients(capability) == clients


@pytest.mark.parametrize(("profile", "allowed"), [("dgx-h100", 48), ("dgx1-v100", 16)])
def test_replicas_above_the_client_limit(profile: str, allowed: int) -> None:
    assert len(tree(mps_config(f"{{name: {GPU}, replicas: {allowed}}}"), profile)[GPU].devices) == 8 * allowed
    with pytest.raises(ConfigError) as info:
        plan_tree(node(profile), mps_config(f"{{name: {GPU}, replicas: {allowed + 1}}}"))
    cap = node(profile).gpus[0].compute_capability
    assert str(info.value) == (
        f"invalid sharing.mps.resources.0.replicas in /c.yaml: invalid MPS configuration: {allowed + 1} "
        f"replicas of GPU 0 ({node(profile).gpus[0].uuid}) exceed the {allowed} MPS clients a GPU of compute "
        f"capability {cap} takes")


def test_mig_devices_are_refused() -> None:
    cfg = mps_config(mig_strategy="single")
    with pytest.raises(ConfigError, match=r"resources\.0\.name in /c\.yaml: "
                                          r"sharing using MPS is not supported for MIG devices"):
        plan_tree(node("h100-mig-single"), cfg)


def test_a_partial_selection_needs_a_rename() -> None:
    with pytest.raises(ConfigError, match=r"resources\.0\.rename in /c\.yaml: "
                                          r"devices shares only some GPUs of nvidia.com/gpu"):
        plan_tree(node("dgx-h100"), mps_config(f"{{name: {GPU}, replicas: 4, devices: [6, 7]}}"))


def test_one_daemon_per_mps_resource() -> None:
    text = ("sharing:\n  mps:\n    resources:\n"
            f"    - {{name: {GPU}, replicas: 2, devices: [0], rename: {SHARED}}}\n"
            f"    - {{name: {GPU}, replicas: 4, devices: [1], rename: {SHARED}}}\n")
    cfg = load({"config_file": "/c.yaml", "mps_root": ROOT}, {}, lambda _: text)
    with pytest.raises(ConfigError, match=r"resources\.1\.rename in /c\.yaml: .* is already shared with MPS by "
                                          r"sharing.mps.resources.0"):
        plan_tree(node("dgx-h100"), cfg)


# --- what each daemon is told -----------------------------------------------------------------------


def test_daemon_settings_from_the_issue() -> None:
    """81559 MiB / 4 replicas -> 20389M per client, 100 / 4 -> 25 % of the threads."""
    planned = plan_tree(node("dgx-h100"), mps_config(f"{{name: {GPU}, replicas: 4, devices: [6, 7], "
                                                     f"rename: {SHARED}}}"))
    (daemon,) = planned.mps
    assert (daemon.resource, daemon.replicas) == (SHARED, 4)
    assert [g.index for g in daemon.gpus] == ["6", "7"]
    assert daemon.settings() == [
        "set_default_device_pinned_mem_limit 6 20389M",
        "set_default_device_pinned_mem_limit 7 20389M",
        "set_default_active_thread_percentage 25",
    ]


def test_daemon_settings_round_down() -> None:
    (daemon,) = plan_tree(node("pcie-l40s"), mps_config(f"{{name: {GPU}, replicas: 3}}")).mps
    assert daemon.settings() == [*(f"set_default_device_pinned_mem_limit {i} 15356M" for i in range(4)),
                                 "set_default_active_thread_percentage 33"]  # 46068 / 3 = 15356; 100 / 3 = 33


def test_folders_and_environment() -> None:
    assert mps.pipe_dir("/mps", SHARED) == "/mps/nvidia.com/gpu.shared/pipe"
    assert mps.log_dir("/mps/", GPU) == "/mps/nvidia.com/gpu/log"
    assert mps.daemon_env("/mps", GPU) == {"CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe",
                                           "CUDA_MPS_LOG_DIRECTORY": "/mps/nvidia.com/gpu/log"}


@pytest.mark.parametrize(
    ("meminfo", "size"),
    [("MemTotal:       131941572 kB\nMemFree: 1 kB\n", "65970786k"), ("", "65536k"), ("MemTotal: x kB\n", "65536k")],
)
def test_shm_size_is_half_of_the_memory(meminfo: str, size: str) -> None:
    assert mps.shm_size(meminfo) == size


def test_time_slicing_has_no_daemons() -> None:
    text = f"sharing:\n  timeSlicing:\n    resources: [{{name: {GPU}, replicas: 4}}]\n"
    assert plan_tree(node("dgx-h100"), load({"config_file": "/c.yaml"}, {}, lambda _: text)).mps == ()


# --- the Allocate answer ------------------------------------------------------------------------------


def answer(cfg: Config, name: str, ids: list[str], profile: str = "dgx-h100") -> ContainerEdits:
    n = node(profile)
    return edits_for(tree(cfg, profile)[name], ids, cfg, n.control_devices, new_annotation_id=lambda: "ID")


def _uuid(i: int) -> str:
    return node("dgx-h100").gpus[i].uuid


PIPE = Mount("/mps/nvidia.com/gpu/pipe", f"{ROOT}/nvidia.com/gpu/pipe")
SHM = Mount("/dev/shm", f"{ROOT}/shm")


def test_one_replica_answer() -> None:
    edits = answer(mps_config(), GPU, [f"{_uuid(1)}::2"])
    assert edits == ContainerEdits(
        envs={"CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe", "NVIDIA_VISIBLE_DEVICES": _uuid(1)},
        mounts=(PIPE, SHM), devices=(), annotations={}, cdi_devices=())
    assert list(edits.envs) == ["CUDA_MPS_PIPE_DIRECTORY", "NVIDIA_VISIBLE_DEVICES"]  # upstream's order
    assert not any(m.read_only for m in edits.mounts)


def test_a_renamed_resource_has_its_own_pipe() -> None:
    cfg = mps_config(f"{{name: {GPU}, replicas: 4, devices: [6, 7], rename: {SHARED}}}")
    edits = answer(cfg, SHARED, [f"{_uuid(7)}::0"])
    assert edits.envs["CUDA_MPS_PIPE_DIRECTORY"] == "/mps/nvidia.com/gpu.shared/pipe"
    assert edits.mounts == (Mount("/mps/nvidia.com/gpu.shared/pipe", f"{ROOT}/nvidia.com/gpu.shared/pipe"), SHM)
    exclusive = answer(cfg, GPU, [_uuid(0)])  # an exclusive GPU on the same node: no MPS
    assert exclusive == ContainerEdits(envs={"NVIDIA_VISIBLE_DEVICES": _uuid(0)})


def test_two_replicas_are_refused_by_default() -> None:
    with pytest.raises(AllocationError) as info:
        answer(mps_config(), GPU, [f"{_uuid(0)}::0", f"{_uuid(0)}::1"])
    assert str(info.value) == ('invalid allocation request for "nvidia.com/gpu": invalid request: maximum request '
                               "size for shared resources is 1; found 2")


def test_without_fail_requests_greater_than_one_the_unique_uuids_in_request_order() -> None:
    cfg = mps_config(block="    failRequestsGreaterThanOne: false\n")
    edits = answer(cfg, GPU, [f"{_uuid(3)}::1", f"{_uuid(0)}::0", f"{_uuid(3)}::2"])
    assert edits == ContainerEdits(
        envs={"CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe",
              "NVIDIA_VISIBLE_DEVICES": f"{_uuid(3)},{_uuid(0)}"},
        mounts=(PIPE, SHM))


def test_with_device_specs() -> None:
    edits = answer(mps_config(pass_device_specs="true"), GPU, [f"{_uuid(2)}::0"])
    assert edits.mounts == (PIPE, SHM)
    assert edits.devices == (DeviceSpec("/dev/nvidiactl", "/dev/nvidiactl"),
                             DeviceSpec("/dev/nvidia-uvm", "/dev/nvidia-uvm"),
                             DeviceSpec("/dev/nvidia-uvm-tools", "/dev/nvidia-uvm-tools"),
                             DeviceSpec("/dev/nvidia2", "/dev/nvidia2"))


def test_mps_mounts_come_before_the_volume_mounts() -> None:
    edits = answer(mps_config(device_list_strategy=["volume-mounts"]), GPU, [f"{_uuid(1)}::0"])
    assert edits.envs == {"CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe",
                          "NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"}
    assert edits.mounts == (PIPE, SHM, Mount(f"/var/run/nvidia-container-devices/{_uuid(1)}", "/dev/null"))


def test_cdi_only_still_gets_the_mps_env_and_mounts() -> None:
    edits = answer(mps_config(device_list_strategy=["cdi-annotations"]), GPU, [f"{_uuid(1)}::0"])
    assert edits == ContainerEdits(
        envs={"CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe"}, mounts=(PIPE, SHM),
        annotations={"cdi.k8s.io/nvidia-device-plugin_ID": f"k8s.device-plugin.nvidia.com/gpu={_uuid(1)}"})


def test_host_paths_follow_the_mps_root() -> None:
    edits = answer(mps_config(mps_root="/var/lib/mps/"), GPU, [f"{_uuid(0)}::0"])
    assert edits.mounts == (Mount("/mps/nvidia.com/gpu/pipe", "/var/lib/mps/nvidia.com/gpu/pipe"),
                            Mount("/dev/shm", "/var/lib/mps/shm"))


def test_time_slicing_gets_no_mps_edits() -> None:
    text = f"sharing:\n  timeSlicing:\n    resources: [{{name: {GPU}, replicas: 4}}]\n"
    cfg = load({"config_file": "/c.yaml", "mps_root": ROOT}, {}, lambda _: text)
    assert answer(cfg, GPU, [f"{_uuid(0)}::0"]) == ContainerEdits(envs={"NVIDIA_VISIBLE_DEVICES": _uuid(0)})
