"""Simulate mode cannot be switched on by accident on a real node.

It used to come from a ConfigMap (`flags.nvdp.simulate`, `flags.nvdp.simulateControl`) or an
extraEnv `NVDP_SIMULATE` and advertise fake GPUs to the real kubelet without a word. The rule
(docs/simulated-profiles.md): command line or environment only; with the kubelet's own socket
only with --simulate-on-real-kubelet; a WARNING banner at start; `simulated="true"` on
nvdp_build_info.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.errors import ConfigError
from nvdp.ops.metrics import make_registry
from nvdp.testing import WAIT_S, FakeKubelet
from tests.conftest import running_plugin
from tests.reliability.conftest import LogWatch

SCRIPT = str(Path(sys.executable).parent / "nvidia-device-plugin")


def run_plugin(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NVDP_", "KUBELET_SOCKET", "CONFIG_FILE"))}
    return subprocess.run([SCRIPT, *args], env={**clean, **env}, capture_output=True, text=True, timeout=WAIT_S)


@pytest.mark.parametrize(("key", "flag"), [("simulate: dgx-h100", "flags.nvdp.simulate"),
                                           ("simulateControl: /tmp/nvdp-control.sock", "flags.nvdp.simulateControl")])
def test_simulate_keys_in_the_config_file_are_exit_2(plugin_dir: Path, key: str, flag: str) -> None:
    config = plugin_dir / "config.yaml"
    config.write_text(f"version: v1\nflags:\n  nvdp:\n    {key}\n")
    result = run_plugin(f"--kubelet-socket={plugin_dir}/kubelet.sock", f"--config-file={config}",
                        *(["--simulate=dgx-h100"] if "Control" in key else []))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"invalid {flag} in {config}: simulate mode is set only on the command line" in result.stderr
    assert not (plugin_dir / "nvidia-gpu.sock").exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_simulate_on_the_real_kubelet_socket_needs_the_explicit_flag(how: str) -> None:
    result = run_plugin("--simulate=dgx-h100") if how == "flag" else run_plugin(NVDP_SIMULATE="dgx-h100")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "invalid --simulate: a simulated node would advertise fake GPUs to this node's kubelet" in result.stderr
    assert "--simulate-on-real-kubelet" in result.stderr


def test_the_rule_itself(plugin_dir: Path) -> None:
    from nvdp.app import preflight

    real = preflight.REAL_KUBELET_SOCKET
    with pytest.raises(ConfigError, match="--simulate"):
        preflight.check(load({"simulate": "h200"}, {}))
    with pytest.raises(ConfigError, match="--simulate"):
        spelled_otherwise = real.replace("/device-plugins/", "//device-plugins/")
        preflight.check(load({"simulate": "h200", "kubelet_socket": spelled_otherwise}, {}))
    preflight.check(load({"simulate": "h200", "simulate_on_real_kubelet": "true"}, {}))  # explicit: allowed
    preflight.check(load({"simulate": "h200"}, {"NVDP_SIMULATE_ON_REAL_KUBELET": "true"}))
    preflight.check(load({"simulate": "h200", "kubelet_socket": ""}, {}))  # serves without registering
    preflight.check(load({"simulate": "h200", "kubelet_socket": str(plugin_dir / "kubelet.sock")}, {}))
    preflight.check(load({}, {}))  # a real node: nothing to say


async def test_a_simulated_node_says_so_in_the_log_and_the_metrics(
    kubelet: FakeKubelet, make_config: Callable[..., Config], logs: LogWatch
) -> None:
    async with running_plugin(make_config("dgx-h100")) as plugin:
        await kubelet.wait_registered("nvidia.com/gpu", timeout=WAIT_S, min_devices=8)
        text = generate_latest(make_registry(plugin.view.state)).decode()
    banner = [r for r in logs.records if r.levelno == logging.WARNING and r.getMessage().startswith("SIMULATED NODE")]
    assert len(banner) == 1, [r.getMessage() for r in logs.records]
    assert 'simulated="true"' in next(line for line in text.splitlines() if line.startswith("nvdp_build_info{"))
