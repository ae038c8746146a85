"""The CLI as operators run it: subprocesses of the console scripts, real signals, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from nvdp.backends.nvml.library import nvml_loadable
from nvdp.testing import FakeKubelet, eventually, eventually_sync

BIN = Path(sys.executable).parent
GPU = "nvidia.com/gpu"


def script(name: str) -> str:
    return str(BIN / name)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NVDP_", "MIG_", "DEVICE_", "FAIL_ON"))}
    env.update(extra)
    return env


@dataclass
class Child:
    """The console script as a child process; its stdout and stderr go to a file, so a test can
    read what it logged so far while it runs."""

    proc: subprocess.Popen[str]
    log: Path

    def output(self) -> str:
        return self.log.read_text()

    def logged(self, text: str) -> bool:
        return text in self.output()


@contextmanager
def plugin_process(*args: str, **env: str) -> Iterator[Child]:
    with tempfile.TemporaryDirectory(prefix="nvdp-cli-") as folder:
        log = Path(folder) / "output.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [script("nvidia-device-plugin"), *args],
                env=clean_env(**env),
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        try:
            yield Child(proc, log)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def stop(child: Child, sig: int = signal.SIGTERM) -> tuple[int, str]:
    child.proc.send_signal(sig)
    code = child.proc.wait(timeout=15)
    return code, child.output()


def test_version_and_help() -> None:
    out = subprocess.run([script("nvidia-device-plugin"), "--version"], capture_output=True, text=True, check=True)
    assert "nvidia-device-plugin, version" in out.stdout
    help_text = subprocess.run([script("nvidia-device-plugin"), "--help"], capture_output=True, text=True,
                               check=True).stdout
    for flag in ("--mig-strategy", "--fail-on-init-error", "--pass-device-specs", "--device-list-strategy",
                 "--device-id-strategy", "--nvidia-driver-root", "--kubelet-socket", "--config-file"):
        assert flag in help_text
    assert "MIG_STRATEGY" in help_text


@pytest.mark.parametrize(
    ("args", "env", "field"),
    [
        pytest.param(["--mig-strategy", "double"], {}, "--mig-strategy", id="flag"),
        pytest.param([], {"DEVICE_ID_STRATEGY": "serial"}, "DEVICE_ID_STRATEGY", id="env"),
        pytest.param([], {"PASS_DEVICE_SPECS": "yes"}, "PASS_DEVICE_SPECS", id="env bool"),
        pytest.param(["--config-file", "/nonexistent.yaml"], {}, "--config-file", id="missing file"),
    ],
)
def test_bad_input_exits_2_naming_the_field_before_touching_sockets(
    plugin_dir: Path, args: list[str], env: dict[str, str], field: str
) -> None:
    result = subprocess.run(
        [script("nvidia-device-plugin"), "--simulate", "dgx-h100", "--kubelet-socket",
         str(plugin_dir / "kubelet.sock"), *args],
        env=clean_env(**env), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert field in result.stderr
    assert "Traceback" not in result.stderr
    assert list(plugin_dir.iterdir()) == []


async def test_sigterm_stops_cleanly_and_removes_sockets(plugin_dir: Path) -> None:
    async with FakeKubelet(str(plugin_dir)) as kubelet:
        with plugin_process("--simulate", "pcie-l40s", "--kubelet-socket", str(plugin_dir / "kubelet.sock")) as child:
            await kubelet.wait_registered(GPU, timeout=20, min_devices=4)
            assert (plugin_dir / "nvidia-gpu.sock").exists()
            code, out = stop(child)
    assert code == 0, out
    assert not (plugin_dir / "nvidia-gpu.sock").exists()
    assert "Running with config" in out


async def test_sigint_also_stops_cleanly(plugin_dir: Path) -> None:
    async with FakeKubelet(str(plugin_dir)) as kubelet:
        with plugin_process("--simulate", "h200", "--kubelet-socket", str(plugin_dir / "kubelet.sock")) as child:
            await kubelet.wait_registered(GPU, timeout=20)
            code, _ = stop(child, signal.SIGINT)
    assert code == 0


async def test_sighup_rereads_the_config_file(plugin_dir: Path) -> None:
    config = plugin_dir / "config.yaml"
    config.write_text("version: v1\n")
    async with FakeKubelet(str(plugin_dir)) as kubelet:
        with plugin_process("--kubelet-socket", str(plugin_dir / "kubelet.sock"),
                            NVDP_SIMULATE="pcie-l40s", CONFIG_FILE=str(config)) as child:
            await kubelet.wait_registered(GPU, timeout=20, min_devices=4)
            config.write_text("version: v1\nsharing:\n  timeSlicing:\n"
                              "    resources: [{name: nvidia.com/gpu, replicas: 3}]\n")
            child.proc.send_signal(signal.SIGHUP)
            await kubelet.wait_for(lambda: len(kubelet.plugins[GPU].devices) == 12, timeout=20)
            code, out = stop(child)
    assert code == 0, out


async def test_sighup_with_simulate_in_the_config_file_keeps_running(plugin_dir: Path) -> None:
    config = plugin_dir / "config.yaml"
    config.write_text("version: v1\n")
    async with FakeKubelet(str(plugin_dir)) as kubelet:
        with plugin_process("--kubelet-socket", str(plugin_dir / "kubelet.sock"), NVDP_SIMULATE="pcie-l40s",
                            CONFIG_FILE=str(config)) as child:
            endpoint = await kubelet.wait_registered(GPU, timeout=20, min_devices=4)
            # Simulate mode never comes from the file (docs/simulated-profiles.md): the reload is refused.
            config.write_text("version: v1\nflags:\n  nvdp:\n    simulate: no-such-profile\n")
            child.proc.send_signal(signal.SIGHUP)
            await eventually(lambda: child.logged("keeping the running"), "the log line that the reload failed")
            assert child.proc.poll() is None and endpoint.connected
            code, out = stop(child)
    assert code == 0, out
    assert "flags.nvdp.simulate" in out and "keeping the running" in out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    ("fail", "expect_exit"), [pytest.param("true", 1, id="fail-on-init-error"),
                              pytest.param("false", None, id="idle")]
)
def test_no_devices(plugin_dir: Path, tmp_path: Path, fail: str, expect_exit: int | None) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("gpus: []\n")
    with plugin_process("--simulate", str(empty), "--kubelet-socket", str(plugin_dir / "kubelet.sock"),
                        f"--fail-on-init-error={fail}") as child:
        if expect_exit is not None:
            child.proc.wait(timeout=20)
            out = child.output()
            assert child.proc.returncode == expect_exit
            assert "no devices found" in out
        else:
            eventually_sync(lambda: child.logged("idling until SIGHUP"), "the log line that it idles",
                            detail=child.output)
            assert child.proc.poll() is None  # idles instead of crash-looping
            code, out = stop(child)
            assert code == 0
            assert "idling until SIGHUP or SIGTERM" in out


def test_a_missing_socket_folder_exits_1_naming_the_path(tmp_path: Path) -> None:
    folder = tmp_path / "not-mounted"
    result = subprocess.run(
        [script("nvidia-device-plugin"), "--simulate", "h200", "--kubelet-socket", str(folder / "kubelet.sock")],
        env=clean_env(), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert f"cannot serve nvidia.com/gpu on {folder}/nvidia-gpu.sock: the folder is missing" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(nvml_loadable(), reason="NVML is present on this machine")
def test_nvml_absent_exits_1_naming_the_paths(plugin_dir: Path) -> None:
    result = subprocess.run(
        [script("nvidia-device-plugin"), "--kubelet-socket", str(plugin_dir / "kubelet.sock"),
         "--driver-root-ctr-path", "/opt/driver"],
        env=clean_env(), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "/opt/driver/usr/lib64/libnvidia-ml.so.1" in result.stderr
    assert "libnvidia-ml.so.1" in result.stderr
    assert "Traceback" not in result.stderr


def test_devices_command_json() -> None:
    out = subprocess.run([script("nvdp"), "devices", "--simulate", "dgx-h100", "--json"],
                         env=clean_env(), capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert len(data["gpus"]) == 8
    assert [d["numa_node"] for d in data["resources"][GPU]] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_devices_command_table_uses_env() -> None:
    out = subprocess.run([script("nvdp"), "devices"], env=clean_env(NVDP_SIMULATE="h200"),
                         capture_output=True, text=True, check=True).stdout
    assert "GPU-561c5ac8-2525-530f-236a-f8e1e82e0c3b" in out and "NVIDIA H200" in out


def test_demo_runs() -> None:
    result = subprocess.run([script("nvdp"), "demo"], env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "registered again" in result.stdout
    assert "NVIDIA_VISIBLE_DEVICES=" in result.stdout
    assert "    nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3\n" in result.stdout  # the node's GFD labels


def test_bad_simulated_profile_exits_2(plugin_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus:\n  - {count: 0}\n")
    for command in (["nvidia-device-plugin"], ["nvdp", "devices"]):
        result = subprocess.run(
            [script(command[0]), *command[1:], "--simulate", str(bad), "--kubelet-socket",
             str(plugin_dir / "kubelet.sock")],
            env=clean_env(), capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 2, result.stderr
        assert "gpus.0.count" in result.stderr and "Traceback" not in result.stderr
    assert list(plugin_dir.iterdir()) == []


OPTIONAL_IMPORTS = (
    "yaml", "pydantic", "prometheus_client", "h11", "nvdp.ops.web", "nvdp.ops.metrics", "nvdp.config.file",
    # The Kubernetes API client: only the config-manager (and later API features) load it.
    "lightkube", "httpx2", "nvdp.kube.client", "nvdp.app.config_manager",
    # CDI spec writing and the MPS programs: only with a cdi-* strategy or MPS sharing.
    "nvdp.core.cdi", "nvdp.backends.driver_root", "nvdp.backends.spec_files", "nvdp.backends.mps",
)
PROFILE_FILE = str(Path(__file__).parents[2] / "src/nvdp/backends/simulated/profiles/pcie-l40s.yaml")
IMPORT_PROBE = """
import sys
from nvdp.config.load import load
import nvdp.app.plugin, nvdp.cli, nvdp.backends.nvml.discovery, nvdp.backends.nvml.library
from nvdp.app.discovery import check_inputs, open_backend
cfg = load(CLI, {}, read_text=lambda path: "version: v1")
check_inputs(cfg)  # as cli._serve does before anything starts
if cfg.simulate:
    open_backend(cfg).discover()
print(",".join(m for m in OPTIONAL_IMPORTS if m in sys.modules))
"""


@pytest.mark.parametrize(
    ("cli", "loaded"),
    [
        pytest.param({}, "", id="plain start: none"),
        pytest.param({"config_file": "/c.yaml"}, "yaml,pydantic,nvdp.config.file", id="config file: its parser"),
        pytest.param({"simulate": "dgx-h100"}, "", id="built-in simulated profile: none"),
        pytest.param({"simulate": PROFILE_FILE}, "yaml,pydantic", id="simulated profile file: its schema"),
    ],
)
def test_start_path_imports_only_what_the_options_need(cli: dict[str, str], loaded: str) -> None:
    """Start-up time: the file parser and the metrics stack load only when asked for."""
    code = f"OPTIONAL_IMPORTS = {OPTIONAL_IMPORTS!r}\nCLI = {cli!r}\n{IMPORT_PROBE}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == loaded
