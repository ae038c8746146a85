"""--metrics-address and --log-format: parsed from the one option table, bad values named."""

from __future__ import annotations

import pytest

from nvdp.config.load import load, parse_listen_address
from nvdp.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(":9401", ("", 9401), id="every interface"),
        pytest.param("0.0.0.0:9401", ("0.0.0.0", 9401), id="ipv4 any"),
        pytest.param("127.0.0.1:0", ("127.0.0.1", 0), id="free port"),
        pytest.param("[::1]:9401", ("::1", 9401), id="ipv6 bracketed"),
        pytest.param("localhost:9401", ("localhost", 9401), id="host name"),
    ],
)
def test_listen_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("9401", id="no colon"),
        pytest.param(":", id="no port"),
        pytest.param(":http", id="named port"),
        pytest.param(":65536", id="port too large"),
        pytest.param("::1:9401", id="ipv6 without brackets"),
        pytest.param("a b:9401", id="space in host"),
    ],
)
def test_bad_listen_address_names_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="--metrics-address"):
        load({"metrics_address": text}, {})


def test_defaults_and_env() -> None:
    cfg = load({}, {})
    assert (cfg.metrics_address, cfg.log_format) == ("", "text")
    cfg = load({}, {"NVDP_METRICS_ADDRESS": ":9401", "NVDP_LOG_FORMAT": "json"})
    assert (cfg.metrics_address, cfg.log_format) == (":9401", "json")
    assert load({"log_format": "text"}, {"NVDP_LOG_FORMAT": "json"}).log_format == "text"


def test_config_file_keys() -> None:
    files = {"c.yaml": "version: v1\nflags:\n  nvdp:\n    metricsAddress: ':9401'\n    logFormat: json\n"}
    cfg = load({"config_file": "c.yaml"}, {}, read_text=files.__getitem__)
    assert (cfg.metrics_address, cfg.log_format) == (":9401", "json")


def test_bad_log_format_names_the_env_var() -> None:
    with pytest.raises(ConfigError, match="invalid NVDP_LOG_FORMAT:"):
        load({}, {"NVDP_LOG_FORMAT": "yaml"})
