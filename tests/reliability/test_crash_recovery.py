"""The plugin killed with SIGKILL and started again over its stale socket; the device-plugin folder
deleted and recreated under a running plugin."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from nvdp.config.options import Config
from nvdp.testing import WAIT_S, FakeKubelet
from nvdp.testing.fake_kubelet import PluginEndpoint
from nvdp.testing.process import PluginProcess
from tests.conftest import running_plugin
from tests.reliability.conftest import LogWatch

GPU = "nvidia.com/gpu"
KILLS = 3


def disconnected(endpoint: PluginEndpoint) -> bool:
    return not endpoint.connected


@pytest.mark.slow
async def test_sigkill_and_restart_over_the_stale_socket(kubelet: FakeKubelet, plugin_dir: Path) -> None:
    plugin = PluginProcess(str(plugin_dir))
    try:
        for round_ in range(KILLS + 1):
            await plugin.start()
            endpoint = await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
            device = sorted(endpoint.devices)[round_ % 8]
            assert (await kubelet.allocate(GPU, [device])).envs["NVIDIA_VISIBLE_DEVICES"] == device
            if round_ < KILLS:
                await plugin.kill()
                await kubelet.wait_for(partial(disconnected, endpoint), WAIT_S)
                assert (plugin_dir / "nvidia-gpu.sock").exists()  # stale: nobody cleaned up
        assert await plugin.stop() == 0
    finally:
        await plugin.kill()
    assert sum(e.kind == "register" for e in kubelet.events) == KILLS + 1
    assert not (plugin_dir / "nvidia-gpu.sock").exists()  # a clean stop removes it
    assert "Traceback" not in plugin.log()
    assert kubelet.errors == []


@pytest.mark.slow
@pytest.mark.parametrize("absent_s", [pytest.param(0.0, id="at once"), pytest.param(2.5, id="after 2.5 s")])
async def test_folder_deleted_and_recreated(
    kubelet: FakeKubelet, make_config: Callable[..., Config], plugin_dir: Path, logs: LogWatch, absent_s: float
) -> None:
    async with running_plugin(make_config("dgx-h100")) as plugin:
        await kubelet.wait_registered(GPU, timeout=WAIT_S)
        for _ in range(2):
            await kubelet.stop()
            shutil.rmtree(plugin_dir)
            # What is tested: the folder gone for `absent_s` (2.5 s outlasts the plugin's 1 s folder poll).
            await asyncio.sleep(absent_s)
            await kubelet.start()  # recreates the folder, then kubelet.sock
            endpoint = await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
            assert (await kubelet.allocate(GPU, sorted(endpoint.devices)[:2])).envs
            assert (plugin_dir / "nvidia-gpu.sock").exists()
        assert plugin.manager.all_registered
    assert kubelet.errors == []
