"""Config resolution: CLI > env > file > default, Go-style parsing, validation naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from nvdp.config import OPTIONS, Config, load, parse_go_bool
from nvdp.errors import ConfigError


def files(**contents: str) -> Any:
    def read(path: str) -> str:
        if path not in contents:
            raise FileNotFoundError(2, "No such file or directory", path)
        return contents[path]

    return read


def test_defaults_match_the_official_plugin() -> None:
    cfg = load({}, {})
    assert cfg.mig_strategy == "none"
    assert cfg.fail_on_init_error is True
    assert cfg.driver_root == "/" and cfg.dev_root == "/"
    assert cfg.pass_device_specs is False
    assert cfg.device_list_strategy == ("envvar",)
    assert cfg.device_id_strategy == "uuid"
    assert cfg.cdi_annotation_prefix == "cdi.k8s.io/"
    assert cfg.nvidia_cdi_hook_path == "/usr/bin/nvidia-ctk"
    assert cfg.container_driver_root == "/driver-root"
    assert cfg.shared_devices_allocation_policy == "distributed"
    assert cfg.device_discovery_strategy == "auto"
    assert cfg.kubelet_socket == "/var/lib/kubelet/device-plugins/kubelet.sock"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        *[pytest.param(v, True, id=f"true {v}") for v in ("1", "t", "T", "TRUE", "true", "True")],
        *[pytest.param(v, False, id=f"false {v}") for v in ("0", "f", "F", "FALSE", "false", "False")],
    ],
)
def test_go_parse_bool(raw: str, expected: bool) -> None:
    assert parse_go_bool("X", raw) is expected


@pytest.mark.parametrize("raw", ["yes", "on", "tRuE", "2", " true"])
def test_go_parse_bool_rejects_what_go_rejects(raw: str) -> None:
    with pytest.raises(ConfigError, match="X"):
        parse_go_bool("X", raw)


@pytest.mark.parametrize(
    ("cli", "env", "file", "expected"),
    [
        pytest.param({}, {}, None, "none", id="default"),
        pytest.param({}, {}, "flags: {migStrategy: single}", "single", id="file over default"),
        pytest.param({}, {"MIG_STRATEGY": "mixed"}, "flags: {migStrategy: single}", "mixed", id="env over file"),
        pytest.param({"mig_strategy": "none"}, {"MIG_STRATEGY": "mixed"}, "flags: {migStrategy: single}", "none",
                     id="cli over env"),
    ],
)
def test_precedence(cli: dict[str, Any], env: dict[str, str], file: str | None, expected: str) -> None:
    if file is not None:
        cli = {**cli, "config_file": "/c.yaml"}
    cfg = load(cli, env, files(**{"/c.yaml": file or ""}))
    assert cfg.mig_strategy == expected


def test_env_set_but_empty_is_false_for_booleans() -> None:
    assert load({}, {"FAIL_ON_INIT_ERROR": ""}).fail_on_init_error is False


def test_invalid_env_boolean_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="FAIL_ON_INIT_ERROR"):
        load({}, {"FAIL_ON_INIT_ERROR": "maybe"})


def test_lists_split_on_commas_and_trim() -> None:
    cfg = load({}, {"DEVICE_LIST_STRATEGY": " envvar , volume-mounts "})
    assert cfg.device_list_strategy == ("envvar", "volume-mounts")


def test_repeated_cli_list_flag_accumulates() -> None:
    cfg = load({"device_list_strategy": ["envvar", "cdi-annotations,cdi-cri"]}, {})
    assert cfg.device_list_strategy == ("envvar", "cdi-annotations", "cdi-cri")


def test_first_env_name_wins() -> None:
    cfg = load({}, {"NVIDIA_CTK_PATH": "/b", "NVIDIA_CDI_HOOK_PATH": "/a"})
    assert cfg.nvidia_cdi_hook_path == "/a"
    assert load({}, {"NVIDIA_CTK_PATH": "/b"}).nvidia_cdi_hook_path == "/b"


@pytest.mark.parametrize(
    ("dev_root_env", "expected"),
    [pytest.param(None, "/run/nvidia/driver", id="unset copies driver root"),
     pytest.param("", "/run/nvidia/driver", id="empty copies driver root"),
     pytest.param("/dev-root", "/dev-root", id="explicit")],
)
def test_dev_root_defaults_to_driver_root(dev_root_env: str | None, expected: str) -> None:
    env = {"NVIDIA_DRIVER_ROOT": "/run/nvidia/driver"}
    if dev_root_env is not None:
        env["NVIDIA_DEV_ROOT"] = dev_root_env
    assert load({}, env).dev_root == expected


@pytest.mark.parametrize(
    ("cli", "field"),
    [
        pytest.param({"mig_strategy": "half"}, "--mig-strategy", id="mig strategy"),
        pytest.param({"device_list_strategy": ["envvar,bogus"]}, "--device-list-strategy", id="list strategy"),
        pytest.param({"device_id_strategy": "serial"}, "--device-id-strategy", id="id strategy"),
        pytest.param({"shared_devices_allocation_policy": "random"}, "--shared-devices-allocation-policy",
                     id="allocation policy"),
        pytest.param({"device_discovery_strategy": "wsl2"}, "--device-discovery-strategy", id="discovery"),
        pytest.param({"imex_channel_ids": "1"}, "--imex-channel-ids", id="imex channels"),
        pytest.param({"imex_channel_ids": "x"}, "--imex-channel-ids", id="imex not ints"),
        pytest.param({"pass_device_specs": "yes"}, "--pass-device-specs", id="bool flag"),
    ],
)
def test_invalid_values_name_the_flag(cli: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(cli, {})
    assert field in str(info.value)


FULL_FILE = """
version: v1
flags:
  migStrategy: mixed
  failOnInitError: false
  nvidiaDriverRoot: /run/nvidia/driver
  gdsEnabled: true
  plugin:
    passDeviceSpecs: true
    deviceListStrategy: volume-mounts
    deviceIDStrategy: index
    containerDriverRoot: /host
  gfd: {oneshot: true}
  someFutureKey: 1
imex: {channelIDs: [0], required: true}
"""


def test_config_file_fields() -> None:
    cfg = load({"config_file": "/c.yaml"}, {}, files(**{"/c.yaml": FULL_FILE}))
    assert cfg.mig_strategy == "mixed"
    assert cfg.fail_on_init_error is False
    assert cfg.driver_root == cfg.dev_root == "/run/nvidia/driver"
    assert cfg.gds_enabled is True
    assert cfg.pass_device_specs is True
    assert cfg.device_list_strategy == ("volume-mounts",)  # a plain string is accepted
    assert cfg.device_id_strategy == "index"
    assert cfg.container_driver_root == "/host"
    assert cfg.imex_channel_ids == (0,) and cfg.imex_required is True


def test_empty_config_file_is_valid() -> None:
    from dataclasses import replace

    cfg = load({"config_file": "/dev/null"}, {}, files(**{"/dev/null": ""}))
    assert replace(cfg, config_file=None) == load({}, {})


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param("version: v2", "version", id="unknown version"),
        pytest.param("flags: {failOnInitError: 3}", "flags.failOnInitError", id="bool field"),
        pytest.param("flags: {plugin: {deviceListStrategy: 3}}", "flags.plugin.deviceListStrategy", id="list field"),
        pytest.param("flags: {plugin: {deviceIDStrategy: serial}}", "--device-id-strategy", id="bad choice"),
        pytest.param("- a list", "--config-file", id="not a mapping"),
        pytest.param("flags: [", "--config-file", id="not yaml"),
        pytest.param("sharing: {timeSlicing: {resources: [{name: gpu, replicas: 0}]}}", "replicas",
                     id="zero replicas"),
    ],
)
def test_bad_config_file_names_the_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({"config_file": "/c.yaml"}, {}, files(**{"/c.yaml": text}))
    assert field in str(info.value)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match=r"error opening config file /nope\.yaml"):
        load({"config_file": "/nope.yaml"}, {}, files())


def test_time_slicing_block() -> None:
    text = """
sharing:
  timeSlicing:
    renameByDefault: true
    failRequestsGreaterThanOne: true
    resources: [{name: nvidia.com/gpu, replicas: 4}]
"""
    cfg = load({"config_file": "/c.yaml"}, {}, files(**{"/c.yaml": text}))
    assert cfg.sharing.strategy == "time-slicing"
    assert cfg.sharing.fail_requests_greater_than_one is True
    (res,) = cfg.sharing.resources
    assert (res.name, res.replicas, res.rename) == ("nvidia.com/gpu", 4, "nvidia.com/gpu.shared")


def test_every_option_has_a_config_field() -> None:
    fields = set(Config.__dataclass_fields__)
    assert {o.field for o in OPTIONS} <= fields
    assert len({o.flag for o in OPTIONS}) == len(OPTIONS)
