"""GPU feature discovery's options: one table (GFD_OPTIONS) read by the plugin's own loader, with
upstream's env names (GFD_* first), CLI > env > file > default, and Go durations."""

from __future__ import annotations

import math
from typing import Any

import pytest

from nvdp.config.load import load
from nvdp.config.options import GFD_OPTIONS, GFD_OUTPUT_FILE, OPTIONS, options_markdown
from nvdp.config.parse import parse_go_duration
from nvdp.errors import ConfigError


def gfd(cli: dict[str, Any] | None = None, env: dict[str, str] | None = None, file: str | None = None) -> Any:
    files = {"c.yaml": file} if file is not None else {}
    if file is not None:
        cli = {"config_file": "c.yaml", **(cli or {})}
    return load(cli or {}, env or {}, read_text=files.__getitem__, options=GFD_OPTIONS)


def test_defaults_are_upstreams() -> None:
    cfg = gfd()
    assert (cfg.oneshot, cfg.no_timestamp, cfg.sleep_interval) == (False, False, 60.0)
    assert cfg.output_file == GFD_OUTPUT_FILE == "/etc/kubernetes/node-feature-discovery/features.d/gfd"
    assert cfg.machine_type_file == "/sys/class/dmi/id/product_name"
    assert cfg.use_node_feature_api is True  # since v0.19.0
    assert (cfg.mig_strategy, cfg.fail_on_init_error, cfg.device_discovery_strategy) == ("none", True, "auto")
    assert (cfg.namespace, cfg.node_name, cfg.pod_name, cfg.kubeconfig) == ("default", "", "", "")
    assert (cfg.kube_api_qps, cfg.kube_api_burst) == (5.0, 10)
    assert cfg.container_driver_root == "/driver-root"


@pytest.mark.parametrize(("field", "envs", "raw", "value"), [
    ("mig_strategy", ("GFD_MIG_STRATEGY", "MIG_STRATEGY"), "mixed", "mixed"),
    ("fail_on_init_error", ("GFD_FAIL_ON_INIT_ERROR", "FAIL_ON_INIT_ERROR"), "false", False),
    ("config_file", ("GFD_CONFIG_FILE", "CONFIG_FILE"), "", ""),
    ("use_node_feature_api", ("GFD_USE_NODE_FEATURE_API", "USE_NODE_FEATURE_API"), "false", False),
])
def test_gfd_env_names_come_first(field: str, envs: tuple[str, str], raw: str, value: Any) -> None:
    gfd_env, plugin_env = envs
    assert getattr(gfd(env={plugin_env: raw}), field) == value
    other = {"mig_strategy": "single", "fail_on_init_error": "true", "config_file": "",
             "use_node_feature_api": "true"}[field]
    # both set: the GFD_* one wins
    assert getattr(gfd(env={gfd_env: raw, plugin_env: other}), field) == value


@pytest.mark.parametrize(("env", "field", "value"), [
    ("GFD_ONESHOT", "oneshot", True),
    ("GFD_NO_TIMESTAMP", "no_timestamp", True),
    ("GFD_SLEEP_INTERVAL", "sleep_interval", 300.0),
    ("GFD_OUTPUT_FILE", "output_file", "/tmp/gfd"),
    ("GFD_MACHINE_TYPE_FILE", "machine_type_file", "/tmp/product"),
    ("DEVICE_DISCOVERY_STRATEGY", "device_discovery_strategy", "nvml"),
    ("DRIVER_ROOT_CTR_PATH", "container_driver_root", "/run/nvidia/driver"),
    ("CONTAINER_DRIVER_ROOT", "container_driver_root", "/run/nvidia/driver"),
    ("KUBECONFIG", "kubeconfig", "/root/.kube/config"),
    ("KUBE_API_QPS", "kube_api_qps", 20.0),
    ("KUBE_API_BURST", "kube_api_burst", 30),
    ("NAMESPACE", "namespace", "gpu-operator"),
    ("NODE_NAME", "node_name", "node-1"),
    ("POD_NAME", "pod_name", "gfd-abcde"),
    ("NVDP_SIMULATE", "simulate", "h200"),
])
def test_every_env_var(env: str, field: str, value: Any) -> None:
    raw = {True: "true", 300.0: "5m", 20.0: "20", 30: "30"}.get(value, str(value))
    assert getattr(gfd(env={env: raw}), field) == value


FILE = """version: v1
flags:
  migStrategy: single
  failOnInitError: false
  useNodeFeatureAPI: false
  gfd:
    oneshot: true
    noTimestamp: true
    sleepInterval: 5s
    outputFile: /run/gfd
    machineTypeFile: /run/product_name
"""


def test_the_config_files_gfd_keys() -> None:
    cfg = gfd(file=FILE)
    assert (cfg.mig_strategy, cfg.fail_on_init_error, cfg.use_node_feature_api) == ("single", False, False)
    assert (cfg.oneshot, cfg.no_timestamp, cfg.sleep_interval) == (True, True, 5.0)
    assert (cfg.output_file, cfg.machine_type_file) == ("/run/gfd", "/run/product_name")


def test_cli_over_env_over_file() -> None:
    assert gfd(env={"GFD_SLEEP_INTERVAL": "10s"}, file=FILE).sleep_interval == 10.0
    assert gfd({"sleep_interval": "20s"}, {"GFD_SLEEP_INTERVAL": "10s"}, FILE).sleep_interval == 20.0
    assert gfd({"oneshot": "false"}, file=FILE).oneshot is False
    assert gfd({"output_file": ""}, {"GFD_OUTPUT_FILE": "/x"}).output_file == ""


def test_file_keys_match_in_any_case_as_encoding_json() -> None:
    text = "version: v1\nFlags:\n  GFD:\n    SleepInterval: infinite\n  usenodefeatureapi: false\n"
    cfg = gfd(file=text)
    assert math.isinf(cfg.sleep_interval) and cfg.use_node_feature_api is False


def test_sleep_interval_in_the_file_as_nanoseconds() -> None:
    assert gfd(file="version: v1\nflags:\n  gfd:\n    sleepInterval: 30000000000\n").sleep_interval == 30.0


@pytest.mark.parametrize(("text", "seconds"), [
    ("60s", 60.0), ("5m", 300.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("300ms", 0.3), ("2m3.5s", 123.5),
    ("1500us", 0.0015), ("1500\u00b5s", 0.0015), ("10ns", 1e-8), ("+1s", 1.0), ("-1s", -1.0), ("0", 0.0),
    ("infinite", math.inf),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration("--sleep-interval", text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["60", "1d", "s", "", "5 m", "infinity", "1h-5m"])
def test_bad_durations_name_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--sleep-interval.*not a duration"):
        gfd({"sleep_interval": text})


@pytest.mark.parametrize("text", ["0s", "-5s"])
def test_a_sleep_interval_must_be_positive(text: str) -> None:
    with pytest.raises(ConfigError, match="positive duration"):
        gfd({"sleep_interval": text})


def test_bad_values_are_config_errors_naming_the_source() -> None:
    with pytest.raises(ConfigError, match="GFD_ONESHOT"):
        gfd(env={"GFD_ONESHOT": "yes please"})
    with pytest.raises(ConfigError, match="--mig-strategy: invalid strategy: 'dual'"):
        gfd({"mig_strategy": "dual"})
    with pytest.raises(ConfigError, match=r"flags\.gfd\.sleepInterval"):
        gfd(file="version: v1\nflags:\n  gfd:\n    sleepInterval: [1]\n")
    with pytest.raises(ConfigError, match="KUBE_API_BURST"):
        gfd(env={"KUBE_API_BURST": "many"})


def test_the_plugin_does_not_read_gfd_settings() -> None:
    cfg = load({}, {"GFD_MIG_STRATEGY": "mixed", "GFD_ONESHOT": "true"})
    assert (cfg.mig_strategy, cfg.oneshot) == ("none", False)
    cfg = load({"config_file": "c"}, {}, read_text=lambda _: FILE)
    assert cfg.oneshot is False and cfg.use_node_feature_api is True  # the plugin's table has no gfd rows
    assert cfg.mig_strategy == "single"  # shared keys are shared


def test_the_tables_share_rows_not_parsers() -> None:
    plugin = {o.field: o for o in OPTIONS}
    for opt in GFD_OPTIONS:
        if opt.field in plugin:  # a shared row: same flag, kind, file key and choices
            base = plugin[opt.field]
            assert (opt.flag, opt.kind, opt.file_key, opt.choices, opt.default) == (
                base.flag, base.kind, base.file_key, base.choices, base.default)
    assert len({o.flag for o in GFD_OPTIONS}) == len(GFD_OPTIONS)


def test_short_and_long_names_of_the_output_file() -> None:
    row = next(o for o in GFD_OPTIONS if o.field == "output_file")
    assert row.aliases == ("output", "o")
    assert "`--output-file`, `--output`, `-o`" in options_markdown(GFD_OPTIONS)
    assert "`60s`" in options_markdown(GFD_OPTIONS)
