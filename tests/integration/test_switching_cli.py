"""Switching from the official plugin (issue 12), as an operator meets it: the console scripts as
child processes, their exit codes and every line they write."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nvdp.backends.nvml.library import nvml_loadable
from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.testing import FakeKubelet, eventually, eventually_sync
from tests.conftest import running_plugin
from tests.integration.test_cli import Child, clean_env, plugin_process, script, stop

GPU = "nvidia.com/gpu"
# A line in nvdp's text format: time, level, logger, message.
OUR_TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) nvdp[.\w]*: ")


def run(*args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([script(args[0]), *args[1:]], env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout)


@contextmanager
def occupied_port() -> Iterator[int]:
    """A TCP port something else listens on: opening a listener there would fail."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def replicas_file(folder: Path, replicas: int) -> Path:
    path = folder / f"replicas-{replicas}.yaml"
    path.write_text(f"version: v1\nsharing:\n  timeSlicing:\n    resources: [{{name: {GPU}, replicas: {replicas}}}]\n")
    return path


# --- 1. a malformed DP_DISABLE_HEALTHCHECKS entry does not stop the plugin -------------------------


async def test_malformed_health_env_runs_and_warns(plugin_dir: Path) -> None:
    async with FakeKubelet(str(plugin_dir)) as kubelet:
        with plugin_process("--simulate", "h200", "--kubelet-socket", str(plugin_dir / "kubelet.sock"),
                            DP_DISABLE_HEALTHCHECKS="xids,foo", DP_ENABLE_HEALTHCHECKS="bar") as child:
            await kubelet.wait_registered(GPU, timeout=20)
            code, out = stop(child)
    assert code == 0, out
    warnings = [line for line in out.splitlines() if "Ignoring malformed Xid value" in line]
    assert len(warnings) == 2, out
    assert "source=DP_DISABLE_HEALTHCHECKS value=foo" in warnings[0]
    assert "source=DP_ENABLE_HEALTHCHECKS value=bar" in warnings[1]


# --- 4. every input-file error is exit 2 naming the file ------------------------------------------


@pytest.fixture
def garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.bin"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def assert_clean_exit_2(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr.split("error:")[0], result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_a_binary_simulated_profile_is_exit_2(garbage: Path, plugin_dir: Path) -> None:
    assert_clean_exit_2(run("nvdp", "devices", "--simulate", str(garbage)), str(garbage), "UTF-8")
    assert_clean_exit_2(run("nvidia-device-plugin", "--simulate", str(garbage), "--kubelet-socket",
                            str(plugin_dir / "kubelet.sock")), str(garbage), "UTF-8")
    assert list(plugin_dir.iterdir()) == []


def test_a_binary_config_file_is_exit_2(garbage: Path, plugin_dir: Path) -> None:
    for command in (["nvidia-device-plugin"], ["nvdp", "devices"]):
        result = run(*command, "--simulate", "h200", "--config-file", str(garbage), "--kubelet-socket",
                     str(plugin_dir / "kubelet.sock"))
        assert_clean_exit_2(result, str(garbage), "UTF-8")
    assert list(plugin_dir.iterdir()) == []


def test_a_config_file_with_nul_bytes_is_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "nul.yaml"
    path.write_bytes(b"version: v1\x00\n")
    assert_clean_exit_2(run("nvdp", "devices", "--simulate", "h200", "--config-file", str(path)), str(path))


def test_directories_given_as_files_are_exit_2(tmp_path: Path, plugin_dir: Path) -> None:
    sock = ["--kubelet-socket", str(plugin_dir / "kubelet.sock")]
    assert_clean_exit_2(run("nvidia-device-plugin", "--simulate", str(tmp_path), *sock), str(tmp_path),
                        "directory")
    assert_clean_exit_2(run("nvidia-device-plugin", "--simulate", "h200", "--config-file", str(tmp_path), *sock),
                        str(tmp_path), "directory")
    assert_clean_exit_2(run("nvidia-device-plugin", "--simulate", "h200", "--simulate-control", str(tmp_path),
                            *sock), "--simulate-control", str(tmp_path), "directory")
    assert list(plugin_dir.iterdir()) == []


# --- 6 and 10. exit 2 starts nothing, also for a device list the kubelet would refuse -----------------


def test_an_unknown_profile_is_exit_2_before_the_metrics_listener(plugin_dir: Path) -> None:
    with occupied_port() as port:
        result = run("nvidia-device-plugin", "--kubelet-socket", str(plugin_dir / "kubelet.sock"),
                     "--metrics-address", f"127.0.0.1:{port}", NVDP_SIMULATE="nope")
    assert_clean_exit_2(result, "NVDP_SIMULATE", "nope")
    assert list(plugin_dir.iterdir()) == []


def test_a_device_list_over_the_kubelet_limit_is_exit_2_naming_it(plugin_dir: Path, tmp_path: Path) -> None:
    config = replicas_file(tmp_path, 9000)
    with occupied_port() as port:
        result = run("nvidia-device-plugin", "--simulate", "dgx-h100", "--config-file", str(config),
                     "--kubelet-socket", str(plugin_dir / "kubelet.sock"), "--metrics-address", f"127.0.0.1:{port}",
                     timeout=60)
    assert_clean_exit_2(result, GPU, "72000 devices", "4194304")
    assert list(plugin_dir.iterdir()) == []


def test_replicas_far_too_many_are_exit_2_at_once(plugin_dir: Path, tmp_path: Path) -> None:
    config = replicas_file(tmp_path, 1_000_000)
    result = run("nvidia-device-plugin", "--simulate", "dgx-h100", "--config-file", str(config),
                 "--kubelet-socket", str(plugin_dir / "kubelet.sock"))
    assert_clean_exit_2(result, f"sharing.timeSlicing.resources.0.replicas in {config}", "1000000")


# --- 7. --fail-on-init-error=false idles while the socket folder is missing -------------------------


async def test_a_missing_socket_folder_idles_and_recovers(plugin_dir: Path) -> None:
    folder = plugin_dir / "device-plugins"
    with plugin_process("--simulate", "h200", "--kubelet-socket", str(folder / "kubelet.sock"),
                        "--fail-on-init-error=false") as child:
        eventually_sync(lambda: child.logged("waiting for the socket folder"), "the line that it waits for the folder",
                        detail=child.output)
        assert child.proc.poll() is None
        folder.mkdir()
        async with FakeKubelet(str(folder)) as kubelet:
            await kubelet.wait_registered(GPU, timeout=30)
            code, out = stop(child)
    assert code == 0, out
    assert out.count("waiting for the socket folder") == 1, out  # said once, however many retries
    assert "Traceback" not in out


# --- 8. every line on stderr is ours -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_line_is_in_our_format(tmp_path: Path, fmt: str) -> None:
    folder = tmp_path / "not-mounted"
    result = run("nvidia-device-plugin", "--simulate", "h200", "--kubelet-socket", str(folder / "kubelet.sock"),
                 "--log-format", fmt)
    assert result.returncode == 1, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line]
    assert any("the folder is missing" in line for line in lines), lines
    for line in lines:
        if fmt == "json":
            assert isinstance(json.loads(line), dict), line
        else:
            assert OUR_TEXT_LINE.match(line), line


# --- 9. "Running with config" in the official names, an object in JSON -------------------------------


async def test_running_with_config_in_json_logs(plugin_dir: Path) -> None:
    async with FakeKubelet(str(plugin_dir)) as kubelet:
        with plugin_process("--simulate", "h200", "--kubelet-socket", str(plugin_dir / "kubelet.sock"),
                            "--log-format", "json", "--pass-device-specs") as child:
            await kubelet.wait_registered(GPU, timeout=20)
            code, out = stop(child)
    assert code == 0, out
    events = [json.loads(line) for line in out.splitlines() if line]
    running = next(e for e in events if e["message"].startswith("Running with config"))
    assert running["config"]["flags"]["plugin"]["passDeviceSpecs"] is True
    assert running["config"]["flags"]["migStrategy"] == "none"


# --- 13. small CLI frictions --------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["nvidia-device-plugin"], ["nvdp"], ["nvdp", "serve"], ["nvdp", "devices"],
                                     ["nvdp", "doctor"]])
def test_dash_h_is_help(command: list[str]) -> None:
    result = run(*command, "-h")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_log_level_in_capitals_is_accepted() -> None:
    result = run("nvdp", "devices", "--simulate", "h200", "--log-level", "DEBUG")
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(nvml_loadable(), reason="NVML is present on this machine")
@pytest.mark.parametrize("command", [["nvidia-device-plugin"], ["nvdp", "devices"]])
def test_nvml_missing_suggests_simulate(plugin_dir: Path, command: list[str]) -> None:
    result = run(*command, "--kubelet-socket", str(plugin_dir / "kubelet.sock"))
    assert result.returncode == 1, result.stderr
    assert "--simulate" in result.stderr, result.stderr


def shared_config(tmp_path: Path, text: str) -> Callable[[], Config]:
    path = tmp_path / "config.yaml"

    def reload() -> Config:
        path.write_text(text)
        return load({"simulate": "pcie-l40s", "kubelet_socket": str(tmp_path / "kubelet.sock"),
                     "config_file": str(path)}, {})

    return reload


@pytest.mark.parametrize(
    ("text", "extras"),
    [
        pytest.param("sharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2}]}}",
                     {"changed": GPU, "added": "-", "removed": "-", "settings": "sharing.timeSlicing"},
                     id="replicas"),
        pytest.param("sharing: {timeSlicing: {renameByDefault: true, resources: [{name: nvidia.com/gpu, "
                     "replicas: 2}]}}",
                     {"changed": "-", "added": "nvidia.com/gpu.shared", "removed": GPU,
                      "settings": "sharing.timeSlicing"}, id="rename"),
        pytest.param("flags: {plugin: {passDeviceSpecs: true, deviceIDStrategy: index}}",
                     {"changed": "-", "added": "-", "removed": "-",
                      "settings": "flags.plugin.deviceIDStrategy,flags.plugin.passDeviceSpecs"}, id="settings"),
    ],
)
async def test_the_sighup_log_says_what_changed(
    kubelet: FakeKubelet, plugin_dir: Path, caplog: pytest.LogCaptureFixture, text: str, extras: dict[str, str]
) -> None:
    reload = shared_config(plugin_dir, "version: v1\n")
    first = reload()
    reload = shared_config(plugin_dir, f"version: v1\n{text}\n")
    async with running_plugin(first, reload_config=reload) as plugin:
        await kubelet.wait_registered(GPU, timeout=20)
        with caplog.at_level(logging.INFO, logger="nvdp.app"):
            plugin.request_reload()
            await eventually(lambda: any(r.getMessage() == "reloaded" for r in caplog.records), "the reload line")
    line = next(r for r in caplog.records if r.getMessage() == "reloaded")
    got: dict[str, Any] = {k: line.__dict__.get(k) for k in extras}
    assert got == extras


# --- 15. a fake kubelet to run by hand -----------------------------------------------------------------


def test_the_fake_kubelet_command_registers_and_allocates(plugin_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "kubelet.log"
    with log.open("w") as sink:
        kubelet = subprocess.Popen([script("nvdp"), "testing", "fake-kubelet", "--dir", str(plugin_dir),
                                    "--allocate", "2"], env=clean_env(), stdout=sink, stderr=subprocess.STDOUT,
                                   text=True)
    kubelet_child = Child(kubelet, log)
    try:
        eventually_sync(lambda: (plugin_dir / "kubelet.sock").exists(), "kubelet.sock", detail=kubelet_child.output)
        with plugin_process("--simulate", "dgx-h100", "--kubelet-socket", str(plugin_dir / "kubelet.sock")) as child:
            eventually_sync(lambda: kubelet_child.logged("NVIDIA_VISIBLE_DEVICES="), "the Allocate answer",
                            detail=kubelet_child.output, timeout_s=30)
            code, _ = stop(child)
        assert code == 0
        eventually_sync(lambda: kubelet_child.logged("disconnected"), "the stream ending", detail=kubelet_child.output)
    finally:
        kubelet.send_signal(signal.SIGTERM)
        kubelet.wait(timeout=15)
    out = kubelet_child.output()
    assert kubelet.returncode == 0, out
    assert f"registered {GPU} (endpoint nvidia-gpu.sock)" in out
    assert f"{GPU}: 8 devices, 8 healthy" in out
    assert re.search(r"preferred 2 of 8: GPU-\S+,GPU-\S+", out), out
    assert re.search(r"allocated 2: .*NVIDIA_VISIBLE_DEVICES=GPU-[^,\s]+,GPU-\S+", out), out
    assert "Traceback" not in out
