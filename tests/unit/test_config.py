"""Config resolution: CLI > env > file > default, Go-style parsing, validation naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from nvdp.config.load import load
from nvdp.config.options import OPTIONS, Config
from nvdp.config.parse import parse_go_bool
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


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        pytest.param({"device_list_strategy": ["bogus"]}, "invalid --device-list-strategy: invalid strategy: 'bogus'",
                     id="strategy flag: the official wording"),
        pytest.param({"log_level": "loud"}, "invalid --log-level: invalid value: 'loud'", id="other choice"),
        pytest.param({"shared_devices_allocation_policy": "random"},
                     "invalid --shared-devices-allocation-policy: invalid value: 'random'", id="policy"),
    ],
)
def test_choice_errors_say_what_was_wrong(cli: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(cli, {})
    assert str(info.value).startswith(message)


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
        pytest.param("flags: {plugin: {deviceIDStrategy: serial}}", "flags.plugin.deviceIDStrategy in /c.yaml",
                     id="bad choice"),
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
    assert cfg.sharing.fail_requests_greater_than_one is True
    (res,) = cfg.sharing.resources
    assert (res.name, res.replicas, res.rename) == ("nvidia.com/gpu", 4, "nvidia.com/gpu.shared")


def _time_slicing(resource: str, rename_by_default: bool = False) -> str:
    return f"sharing: {{timeSlicing: {{renameByDefault: {str(rename_by_default).lower()}, resources: [{resource}]}}}}"


_LONG = "x" * 53  # nvidia.com/ + 53 = 64 characters


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        pytest.param(_time_slicing("{name: gpu, replicas: 1}"), "resources.0.replicas",
                     "number of replicas must be >= 2", id="one replica"),
        pytest.param(_time_slicing("{name: gpu, replicas: '4'}"), "resources.0.replicas", "integer",
                     id="replicas as text"),
        pytest.param(_time_slicing("{name: gpu}"), "resources.0.replicas", "no replicas specified",
                     id="no replicas"),
        pytest.param(_time_slicing("{replicas: 2}"), "resources.0.name", "no resource name specified",
                     id="no name"),
        pytest.param("sharing: {timeSlicing: {resources: []}}", "sharing.timeSlicing.resources",
                     "no resources specified", id="empty resources"),
        pytest.param("sharing: {timeSlicing: {renameByDefault: true}}", "sharing.timeSlicing.resources",
                     "no resources specified", id="no resources key"),
        pytest.param("sharing: {mps: {}}", "sharing.mps.resources", "no resources specified", id="empty mps"),
        pytest.param(_time_slicing("{name: 'Nvidia_GPU!', replicas: 2}"), "resources.0.name",
                     "incorrect format for resource name", id="not dns-1123"),
        pytest.param(_time_slicing("{name: example.com/gpu, replicas: 2}"), "resources.0.name",
                     "incorrect format for resource name 'nvidia.com/example.com/gpu'", id="other domain"),
        pytest.param(_time_slicing(f"{{name: {_LONG}, replicas: 2}}"), "resources.0.name",
                     "63 characters or less", id="64 characters"),
        pytest.param(_time_slicing("{name: gpu, replicas: 2, rename: GPU_TS}"), "resources.0.rename",
                     "incorrect format for resource name", id="bad rename"),
        pytest.param(_time_slicing(f"{{name: {_LONG[:-7]}, replicas: 2}}", rename_by_default=True),
                     "resources.0.name", "served as", id="shared suffix too long"),
        pytest.param(_time_slicing("{name: gpu, replicas: 2, devices: foo}"), "resources.0.devices",
                     "the only valid string input is 'all'", id="devices other string"),
        pytest.param(_time_slicing("{name: gpu, replicas: 2, devices: 0}"), "resources.0.devices",
                     "a count of devices must be > 0", id="devices zero count"),
        pytest.param(_time_slicing("{name: gpu, replicas: 2, devices: 2.0}"), "resources.0.devices",
                     "a count of devices", id="devices float"),
        pytest.param(_time_slicing("{name: gpu, replicas: 2, devices: [0, foo]}"), "resources.0.devices",
                     "unsupported type for device in devices list: 'foo'", id="devices bad item"),
        pytest.param(_time_slicing("{name: gpu, replicas: 2, devices: [-1]}"), "resources.0.devices",
                     "unsupported type", id="devices negative index"),
    ],
)
def test_sharing_validation_matches_the_official_plugin(text: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({"config_file": "/c.yaml"}, {}, files(**{"/c.yaml": text}))
    key = field if field.startswith("sharing") else f"sharing.timeSlicing.{field}"
    assert f"invalid {key} in /c.yaml:" in str(info.value)
    assert message in str(info.value)
    assert "Value error" not in str(info.value)


@pytest.mark.parametrize(
    ("resource", "rename_by_default", "served"),
    [
        pytest.param("{name: gpu, replicas: 2}", False, ("nvidia.com/gpu", None, "all"), id="prefix added"),
        # Unlike the official plugin (DisableResourceNamingInConfig drops them), nvdp honours an
        # explicit rename and the devices selection (docs/sharing.md).
        pytest.param("{name: gpu, replicas: 2, rename: gpu-ts}", False, ("nvidia.com/gpu", "nvidia.com/gpu-ts", "all"),
                     id="rename honoured"),
        pytest.param("{name: gpu, replicas: 2, rename: gpu-ts}", True, ("nvidia.com/gpu", "nvidia.com/gpu-ts", "all"),
                     id="an explicit rename wins over renameByDefault"),
        pytest.param("{name: gpu, replicas: 2}", True, ("nvidia.com/gpu", "nvidia.com/gpu.shared", "all"),
                     id="renameByDefault"),
        pytest.param("{name: gpu, replicas: 2, rename: gpu}", False, ("nvidia.com/gpu", None, "all"),
                     id="rename to itself is no rename"),
        pytest.param(f"{{name: {_LONG[:-1]}, replicas: 2}}", False, (f"nvidia.com/{_LONG[:-1]}", None, "all"),
                     id="63 characters"),
        pytest.param("{name: gpu, replicas: 2, devices: all}", False, ("nvidia.com/gpu", None, "all"),
                     id="devices all"),
        pytest.param("{name: gpu, replicas: 2, devices: 3}", False, ("nvidia.com/gpu", None, 3), id="devices count"),
        pytest.param("{name: gpu, replicas: 2, devices: [0, '1', '0:1', GPU-a, MIG-b, MIG-GPU-c/1/0]}", False,
                     ("nvidia.com/gpu", None, ("0", "1", "0:1", "GPU-a", "MIG-b", "MIG-GPU-c/1/0")), id="devices list"),
    ],
)
def test_sharing_names_and_selection(
    resource: str, rename_by_default: bool, served: tuple[str, str | None, object]
) -> None:
    cfg = load({"config_file": "/c.yaml"}, {}, files(**{"/c.yaml": _time_slicing(resource, rename_by_default)}))
    (res,) = cfg.sharing.resources
    assert (res.name, res.rename, res.devices) == served
    assert res.where == "sharing.timeSlicing.resources.0" and res.rename_by_default is rename_by_default
    assert cfg.sharing.strategy == "time-slicing" and not cfg.sharing.fail_requests_greater_than_one


def test_every_option_has_a_config_field() -> None:
    fields = set(Config.__dataclass_fields__)
    assert {o.field for o in OPTIONS} <= fields
    assert len({o.flag for o in OPTIONS}) == len(OPTIONS)


@pytest.mark.parametrize(
    ("text", "mig", "ids"),
    [
        pytest.param("Flags: {MigStrategy: mixed, Plugin: {DeviceIDStrategy: index}}", "mixed", "index",
                     id="any case, as encoding/json"),
        pytest.param("flags: {migstrategy: single, migStrategy: mixed}", "mixed", "uuid", id="exact key wins"),
        pytest.param("flags: {migStrategy: mixed, migstrategy: single}", "mixed", "uuid", id="exact key wins after"),
        pytest.param("VERSION: v1\nflags: {plugin: {deviceidstrategy: index}}", "none", "index", id="nested"),
    ],
)
def test_config_file_keys_match_case_insensitively(text: str, mig: str, ids: str) -> None:
    cfg = load({"config_file": "/c.yaml"}, {}, files(**{"/c.yaml": text}))
    assert (cfg.mig_strategy, cfg.device_id_strategy) == (mig, ids)


def test_sharing_block_keys_stay_exact() -> None:
    # Upstream decodes these with its own code that matches exact names only.
    text = "sharing: {TimeSlicing: {Resources: [{name: gpu, replicas: 2}]}}"
    with pytest.raises(ConfigError, match="no resources specified"):
        load({"config_file": "/c.yaml"}, {}, files(**{"/c.yaml": text}))


def test_resources_block_is_ignored_with_the_official_warning(caplog: pytest.LogCaptureFixture) -> None:
    text = "resources: {gpus: [{pattern: '*', name: gpu}]}"
    load({"config_file": "/c.yaml"}, {}, files(**{"/c.yaml": text}))
    assert "Customizing the 'resources' field is not yet supported" in caplog.text
