"""Health settings through config.py: flags, the official DP_* env vars, the config file."""

from __future__ import annotations

from typing import Any

import pytest

from nvdp.config.load import load
from nvdp.core.health import DEFAULT_IGNORED_XIDS, settings_from
from nvdp.errors import ConfigError


def read(text: str) -> Any:
    return lambda path: text


def test_defaults() -> None:
    settings = settings_from(load({}, {}))
    assert settings.switches.events and settings.switches.probes
    assert settings.switches.xids.ignored == DEFAULT_IGNORED_XIDS
    assert (settings.quiet_period_s, settings.probe_interval_s, settings.wait_error_threshold) == (60.0, 10.0, 5)


@pytest.mark.parametrize(
    ("cli", "env", "file", "acts_on_48", "acts_on_13"),
    [
        pytest.param({}, {"DP_DISABLE_HEALTHCHECKS": "48"}, None, False, False, id="env disable"),
        pytest.param({}, {"DP_ENABLE_HEALTHCHECKS": "13"}, None, True, True, id="env enable"),
        pytest.param({"disable_healthchecks": ["48"]}, {}, None, False, False, id="flag disable"),
        pytest.param({}, {}, "flags: {nvdp: {health: {disable: [48]}}}", False, False, id="file list of ints"),
        pytest.param({}, {}, "flags: {nvdp: {health: {enable: '13'}}}", True, True, id="file string"),
        pytest.param({}, {"DP_DISABLE_HEALTHCHECKS": ""}, "flags: {nvdp: {health: {disable: [48]}}}", True, False,
                     id="empty env overrides the file"),
        pytest.param({"enable_healthchecks": ["all"]}, {"DP_DISABLE_HEALTHCHECKS": "all"}, None, True, True,
                     id="flag enable=all with env disable=all"),
    ],
)
def test_sources(cli: dict[str, Any], env: dict[str, str], file: str | None, acts_on_48: bool,
                 acts_on_13: bool) -> None:
    values = dict(cli)
    if file is not None:
        values["config_file"] = "/cfg.yaml"
    cfg = load(values, env, read(f"version: v1\n{file}\n" if file else ""))
    xids = settings_from(cfg).switches.xids
    assert (xids.acts_on(48), xids.acts_on(13)) == (acts_on_48, acts_on_13)


def test_timing_options_from_env_and_file() -> None:
    cfg = load(
        {"config_file": "/cfg.yaml"},
        {"NVDP_HEALTH_QUIET_PERIOD": "2.5"},
        read("version: v1\nflags:\n  nvdp:\n    health: {probeInterval: 0, waitErrorThreshold: 3}\n"),
    )
    settings = settings_from(cfg)
    assert (settings.quiet_period_s, settings.probe_interval_s, settings.wait_error_threshold) == (2.5, 0.0, 3)
    assert not settings.periodic_probes and settings.switches.probes


@pytest.mark.parametrize(
    ("cli", "env", "field"),
    [
        pytest.param({"health_quiet_period": "-1"}, {}, "--health-quiet-period", id="negative quiet period"),
        pytest.param({"health_quiet_period": "nan"}, {}, "--health-quiet-period", id="nan quiet period"),
        pytest.param({}, {"NVDP_HEALTH_PROBE_INTERVAL": "soon"}, "NVDP_HEALTH_PROBE_INTERVAL", id="not a number"),
        pytest.param({"health_wait_error_threshold": "0"}, {}, "--health-wait-error-threshold", id="threshold 0"),
        pytest.param({"simulate_control": "/tmp/x.sock"}, {}, "--simulate-control", id="control without simulate"),
        pytest.param({"health_nvml_timeout": "0"}, {}, "--health-nvml-timeout", id="no deadline"),
        pytest.param({}, {"NVDP_HEALTH_NVML_TIMEOUT": "25"}, "NVDP_HEALTH_NVML_TIMEOUT",
                     id="deadline past what PreStartContainer may take (named as set)"),
        pytest.param({"cluster_health": "true"}, {}, "--cluster-health", id="cluster health without a node name"),
        pytest.param({"taint_on_fatal": "true"}, {"NODE_NAME": "n1"}, "--taint-on-fatal",
                     id="taint without cluster health"),
        pytest.param({"gpu_hygiene_memory_threshold": "-1"}, {}, "--gpu-hygiene-memory-threshold",
                     id="negative hygiene threshold"),
    ],
)
def test_bad_values_name_the_field(cli: dict[str, Any], env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(cli, env)
    assert info.value.field == field


def test_simulate_control_from_env() -> None:
    cfg = load({"simulate": "h200"}, {"NVDP_SIMULATE_CONTROL": "/run/nvdp/control.sock"})
    assert cfg.simulate_control == "/run/nvdp/control.sock"


def test_cluster_and_hygiene_options() -> None:
    cfg = load({"cluster_health": "true", "taint_on_fatal": "true"}, {"NODE_NAME": "gpu-node-7",
                                                                      "NVDP_GPU_HYGIENE": "1"})
    assert (cfg.cluster_health, cfg.taint_on_fatal, cfg.node_name, cfg.gpu_hygiene) == (True, True, "gpu-node-7", True)
    assert settings_from(cfg).hygiene_threshold_bytes == 1024 * 2**20
    assert settings_from(load({}, {})).hygiene_threshold_bytes is None  # off by default
