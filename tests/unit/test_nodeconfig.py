"""config-manager, the pure and file-level parts: selection rules, settings, finding the process to
signal, the link, the metrics."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from nvdp.app.configlink import available_configs, point
from nvdp.app.procsignal import catches, find_process
from nvdp.config.manager import DEFAULT_LABEL, ManagerSettings, load_manager_settings
from nvdp.core.nodeconfig import Chosen, NoChoice, Unknown, choose
from nvdp.errors import ConfigError, NodeConfigError
from nvdp.ops.manager_metrics import render
from nvdp.ops.manager_state import ManagerState
from nvdp.testing.configmap import write_configmap

ABC = frozenset({"a", "b", "default"})


@pytest.mark.parametrize(
    ("label", "available", "default", "fallbacks", "expected"),
    [
        pytest.param("a", ABC, "b", ("named",), Chosen("a", "label"), id="the label wins"),
        pytest.param("zz", ABC, "b", ("named",), Unknown("zz", ("a", "b", "default")), id="unknown label"),
        pytest.param("", ABC, "b", ("named",), Chosen("b", "default"), id="no label: DEFAULT_CONFIG"),
        pytest.param("", ABC, "zz", ("named",), NoChoice("the default config 'zz' does not exist "
                                                         "(available: a, b, default)"), id="default missing"),
        pytest.param("", ABC, "", ("named", "single"), Chosen("default", "named"), id="named"),
        pytest.param("", frozenset({"x"}), "", ("named", "single"), Chosen("x", "single"), id="single"),
        pytest.param("", frozenset({"x", "y"}), "", ("single", "empty"), Chosen("", "empty"), id="empty"),
        pytest.param("", frozenset({"x", "y"}), "", ("named", "single"), None, id="nothing chosen"),
        pytest.param("", frozenset(), "", ("empty",), NoChoice("no configuration files available"),
                     id="no files at all, even with empty"),
        pytest.param("a", frozenset(), "", (), NoChoice("no configuration files available"), id="no files, label"),
    ],
)
def test_selection_rules(label: str, available: frozenset[str], default: str, fallbacks: tuple[str, ...],
                         expected: object) -> None:
    result = choose(label, available, default, fallbacks)  # type: ignore[arg-type]
    if expected is None:
        assert isinstance(result, NoChoice) and "no fallback strategy (named,single)" in result.reason
    else:
        assert result == expected


def test_settings_from_the_official_env() -> None:
    env = {"NODE_NAME": "n1", "CONFIG_FILE_SRCDIR": "/available-configs", "CONFIG_FILE_DST": "/config/config.yaml",
           "DEFAULT_CONFIG": "", "FALLBACK_STRATEGIES": "named,single", "ONESHOT": "true", "SEND_SIGNAL": "false",
           "SIGNAL": "", "PROCESS_TO_SIGNAL": "", "KUBECONFIG": "", "NODE_LABEL": DEFAULT_LABEL}
    s = load_manager_settings({}, env)  # the chart's init container
    assert s == ManagerSettings(node_name="n1", srcdir="/available-configs", dst="/config/config.yaml",
                                fallbacks=("named", "single"), oneshot=True, send_signal=False)
    assert (s.signal, s.process_to_signal) == (signal.SIGHUP, "nvidia-device-plugin")
    flags = load_manager_settings({"oneshot": "false", "signal": "10", "node_name": "n2"}, env)
    assert (flags.oneshot, flags.signal, flags.node_name) == (False, 10, "n2")


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        pytest.param({"NODE_NAME": ""}, "--node-name (NODE_NAME): must not be empty", id="no node"),
        pytest.param({"CONFIG_FILE_DST": ""}, "--config-file-dst (CONFIG_FILE_DST)", id="no destination"),
        pytest.param({"FALLBACK_STRATEGIES": "named,first"}, "unknown fallback strategy 'first'", id="bad fallback"),
        pytest.param({"ONESHOT": "yes"}, "--oneshot (ONESHOT)", id="bad bool"),
        pytest.param({"SIGNAL": "HUP"}, "--signal (SIGNAL): 'HUP' is not an integer", id="signal by name"),
        pytest.param({"SIGNAL": "0"}, "is not a signal number", id="signal 0"),
        pytest.param({"NVDP_CONFIG_MANAGER_METRICS_ADDRESS": "9402"}, "is not HOST:PORT", id="metrics address"),
    ],
)
def test_bad_settings_name_the_flag_and_env(env: dict[str, str], fragment: str) -> None:
    base = {"NODE_NAME": "n1", "CONFIG_FILE_SRCDIR": "/a", "CONFIG_FILE_DST": "/c/config.yaml"}
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_manager_settings({}, {**base, **env})


def _proc(root: Path, pid: int, argv: list[str], sigcgt: str = "0000000000000000") -> None:
    folder = root / str(pid)
    folder.mkdir()
    (folder / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (folder / "status").write_text(f"Name:\tx\nSigBlk:\t0000000000000000\nSigCgt:\t{sigcgt}\n")


def test_the_first_process_whose_argv0_is_exactly_the_name(tmp_path: Path) -> None:
    _proc(tmp_path, 7, ["/usr/bin/python3", "/usr/bin/nvidia-device-plugin"])  # a console script: no match
    _proc(tmp_path, 30, ["nvidia-device-plugin", "--fail-on-init-error=false"])
    _proc(tmp_path, 200, ["nvidia-device-plugin"])
    _proc(tmp_path, 9, ["nvidia-device-plugin-extra"])
    (tmp_path / "self").mkdir()
    (tmp_path / "41").mkdir()  # no cmdline: a process that went away
    assert find_process("nvidia-device-plugin", str(tmp_path)) == 30  # the lowest PID, not 200
    assert find_process("gpu-feature-discovery", str(tmp_path)) is None


def test_catches_reads_sigcgt(tmp_path: Path) -> None:
    _proc(tmp_path, 5, ["p"], sigcgt=f"{1 << (signal.SIGHUP - 1) | 1 << (signal.SIGTERM - 1):016x}")
    _proc(tmp_path, 6, ["p"])
    assert catches(5, signal.SIGHUP, str(tmp_path)) is True
    assert catches(5, signal.SIGUSR1, str(tmp_path)) is False
    assert catches(6, signal.SIGHUP, str(tmp_path)) is False
    assert catches(99, signal.SIGHUP, str(tmp_path)) is None


def test_catches_sees_this_process_handlers() -> None:
    old = signal.signal(signal.SIGUSR2, lambda *_: None)
    try:
        assert catches(os.getpid(), signal.SIGUSR2) is True
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert catches(os.getpid(), signal.SIGUSR2) is False


def test_configmap_internals_and_folders_are_not_configs(tmp_path: Path) -> None:
    write_configmap(str(tmp_path), {"a": "x", "b": "y"})
    (tmp_path / "subdir").mkdir()
    internals = [n for n in os.listdir(tmp_path) if n.startswith("..")]
    assert "..data" in internals and len(internals) == 2  # the link and one timestamped folder
    assert available_configs(str(tmp_path)) == {"a", "b"}


def test_point_is_atomic_and_idempotent(tmp_path: Path) -> None:
    write_configmap(str(tmp_path / "src"), {"a": "A", "b": "B"})
    dst = tmp_path / "config.yaml"
    assert point(str(dst), str(tmp_path / "src" / "a")) is True
    assert point(str(dst), str(tmp_path / "src" / "a")) is False  # same file: no change
    inode_before = os.lstat(dst).st_ino
    assert point(str(dst), str(tmp_path / "src" / "b")) is True
    assert dst.read_text() == "B" and os.lstat(dst).st_ino != inode_before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    write_configmap(str(tmp_path / "src"), {"a": "A", "b": "B2"})  # a ConfigMap update follows ..data
    assert point(str(dst), str(tmp_path / "src" / "b")) is False and dst.read_text() == "B2"
    with pytest.raises(NodeConfigError, match="does not exist"):
        point(str(dst), str(tmp_path / "src" / "zz"))
    assert dst.read_text() == "B2"


def test_metrics_render_the_state() -> None:
    text = render(ManagerState(config="b", source="label", label="b", api_up=True, switches=2, signals=2)).decode()
    assert 'nvdp_config_manager_info{config="b",label="b",source="label"} 1.0' in text
    assert 'nvdp_config_manager_label_unknown{value=""} 0.0' in text
    assert "nvdp_config_manager_switches_total 2.0" in text and "nvdp_config_manager_api_up 1.0" in text
    unknown = render(ManagerState(config="b", source="kept", label="zz", unknown_label="zz")).decode()
    assert 'nvdp_config_manager_label_unknown{value="zz"} 1.0' in unknown
