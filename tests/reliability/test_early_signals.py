"""Signals during start-up, on the real console script.

A config-manager style reloader may send SIGHUP as soon as the plugin's process exists; the
kubelet or an operator may stop it just as early. Before the plugin's event loop handled signals
(a few hundred milliseconds of imports, config loading and discovery), a SIGHUP killed it (exit
129 in a container: the default action) and a SIGTERM ended it with -15. Now the console script
installs its handlers before importing anything heavy: an early SIGHUP is remembered and applied
once the plugin runs, SIGTERM and SIGINT stop it cleanly (exit 0) at any point.

"Early" is made deterministic by watching the child: the signal goes out the moment gRPC's
native module appears in /proc/PID/maps (the plugin's imports are under way), or at a later
point of start-up.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from nvdp.app.discovery import open_backend
from nvdp.app.plugin import Plugin
from nvdp.backends.base import GpuBackend
from nvdp.config.options import Config
from nvdp.testing import WAIT_S, FakeKubelet, eventually
from nvdp.testing.process import PluginProcess

GPU = "nvidia.com/gpu"


def grpc_loaded(pid: int) -> bool:
    try:
        return "cygrpc" in Path(f"/proc/{pid}/maps").read_text()
    except FileNotFoundError:  # exited
        return True


async def when_importing(plugin: PluginProcess) -> None:
    await eventually(lambda: grpc_loaded(plugin.pid), "gRPC's native module loaded", poll_s=0.001)


async def when_running(plugin: PluginProcess) -> None:
    await eventually(lambda: "Running with config" in plugin.log(), "the plugin's first line", poll_s=0.001)


async def when_serving(plugin: PluginProcess) -> None:
    await eventually(lambda: (Path(plugin.folder) / "nvidia-gpu.sock").exists(), "the resource socket", poll_s=0.001)


async def exited(plugin: PluginProcess) -> int:
    assert plugin.process is not None
    return await asyncio.wait_for(plugin.process.wait(), WAIT_S)


async def test_a_sighup_while_importing_is_applied_once_the_plugin_runs(
    kubelet: FakeKubelet, plugin_dir: Path
) -> None:
    plugin = PluginProcess(str(plugin_dir))
    async with plugin:
        await when_importing(plugin)
        plugin.signal(signal.SIGHUP)
        await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
        await eventually(lambda: "reloaded" in plugin.log(), "the remembered reload")
        assert plugin.process is not None and plugin.process.returncode is None
        code = await plugin.stop()
    assert code == 0, plugin.log()[-2000:]
    assert plugin.log().count(" reloaded") == 1


Moment = Callable[[PluginProcess], Awaitable[None]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("moment", [when_importing, when_running, when_serving],
                         ids=["importing", "running", "serving"])
async def test_a_stop_signal_at_any_point_of_start_up_exits_0(
    kubelet: FakeKubelet, plugin_dir: Path, sig: signal.Signals, moment: Moment
) -> None:
    plugin = PluginProcess(str(plugin_dir))
    await plugin.start()
    try:
        await moment(plugin)
        sent = time.monotonic()
        plugin.signal(sig)
        code = await exited(plugin)
        took = time.monotonic() - sent
    finally:
        await plugin.stop()
    print(f"{sig.name} while {moment.__name__.removeprefix('when_')}: exit {code} after {took:.2f} s")
    assert code == 0, plugin.log()[-2000:]
    assert not (plugin_dir / "nvidia-gpu.sock").exists()
    assert "Traceback" not in plugin.log()


async def test_a_stop_during_a_slow_discovery_does_not_wait_for_it(
    kubelet: FakeKubelet, make_config: Callable[..., Config]
) -> None:
    """A stop used to be acted on only once start-up was over (a slow discovery, a huge config)."""
    entered, release = threading.Event(), threading.Event()

    def slow_backend(cfg: Config) -> GpuBackend:
        entered.set()
        release.wait(WAIT_S)  # a discovery that takes its time, in its worker thread
        return open_backend(cfg)

    plugin = Plugin(make_config("dgx-h100"), backend_factory=slow_backend)
    task = asyncio.create_task(plugin.run())
    try:
        await eventually(entered.is_set, "discovery under way")
        plugin.stop()
        done, _ = await asyncio.wait({task}, timeout=5.0)
    finally:
        release.set()
    assert done, "run() waited for the discovery to finish"
    task.result()
    assert all(e.kind != "register" for e in kubelet.events)


# Every long-running program goes through the launcher (pyproject.toml's console scripts, and the
# image's `python -m nvdp.entrypoint`): each is run in a fresh interpreter with --version (click
# exits before any of the program's own handlers exist), then the SIGHUP handler is looked at.
_PROBE = """
import runpy, signal, sys
from nvdp.app import early_signals
sys.argv = [sys.argv[1], *sys.argv[2:], "--version"]
try:
    if sys.argv[0] == "entrypoint":
        runpy.run_module("nvdp.entrypoint", run_name="__main__")
    else:
        from nvdp import launch
        getattr(launch, sys.argv[0])()
except SystemExit:
    pass
print("installed" if early_signals.installed() else "default")
"""


@pytest.mark.parametrize("entry", ["nvidia_device_plugin", "gpu_feature_discovery", "mps_control_daemon",
                                   "config_manager", "entrypoint"])
def test_every_program_installs_the_early_handlers(entry: str) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _PROBE, entry], capture_output=True, text=True, timeout=WAIT_S)
    assert result.stdout.strip().splitlines()[-1] == "installed", result.stdout + result.stderr


def test_the_console_scripts_point_at_the_launcher() -> None:
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert all(target.startswith("nvdp.launch:") for target in scripts.values()), scripts
