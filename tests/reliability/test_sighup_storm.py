"""A SIGHUP storm on the real process: 50 signals in 5 s, the config file rewritten before each.

The last config wins; the resource keeps its registration and its streams (the kubelet's and a
watcher's) through every reload, whether the reload changed its device list or only settings.
TODO(mig): with mixed MIG strategy a node serves several resources; add one that the storm never
changes and check that its stream sees no message at all.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import pytest

from nvdp._proto import api_pb2 as pb
from nvdp._proto import api_pb2_grpc as pb_grpc
from nvdp.testing import FakeKubelet
from nvdp.testing.process import PluginProcess
from tests.reliability.conftest import WAIT_S, eventually

GPU = "nvidia.com/gpu"
SIGNALS = 50
INTERVAL_S = 0.1
FINAL_REPLICAS = 5  # used only by the last config, so seeing it proves the last one won


def write_config(path: Path, replicas: int, device_specs: bool) -> None:
    """Write atomically, as a ConfigMap update does (a symlink swap), so no reload sees half a file."""
    staging = path.with_suffix(".new")
    staging.write_text(
        f"version: v1\nflags:\n  plugin:\n    passDeviceSpecs: {str(device_specs).lower()}\n"
        f"sharing:\n  timeSlicing:\n    resources:\n    - name: {GPU}\n      replicas: {replicas}\n"
    )
    os.replace(staging, path)


async def watch(socket: str, seen: list[int]) -> None:
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        async for response in pb_grpc.DevicePluginStub(channel).ListAndWatch(pb.Empty()):
            seen.append(len(response.devices))


@pytest.mark.slow
async def test_sighup_storm_last_config_wins_and_streams_survive(kubelet: FakeKubelet, plugin_dir: Path) -> None:
    config = plugin_dir / "config.yaml"
    write_config(config, replicas=2, device_specs=False)
    plugin = PluginProcess(str(plugin_dir), ("--simulate", "dgx-h100", f"--config-file={config}"))
    async with plugin:
        endpoint = await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=16)
        seen: list[int] = []
        watcher = asyncio.create_task(watch(str(plugin_dir / "nvidia-gpu.sock"), seen))
        await eventually(lambda: bool(seen))

        for i in range(SIGNALS):
            last = i == SIGNALS - 1
            write_config(config, replicas=FINAL_REPLICAS if last else 2 + i % 3, device_specs=last or i % 2 == 0)
            plugin.signal(signal.SIGHUP)
            await asyncio.sleep(INTERVAL_S)

        await kubelet.wait_for(lambda: len(endpoint.devices) == 8 * FINAL_REPLICAS, WAIT_S)
        await eventually(lambda: bool(seen) and seen[-1] == 8 * FINAL_REPLICAS)
        device = sorted(endpoint.devices)[0]
        answer = await kubelet.allocate(GPU, [device])
        assert "/dev/nvidiactl" in [d.container_path for d in answer.devices]  # passDeviceSpecs: true
        assert endpoint.connected and not watcher.done()  # both streams lived through the storm
        watcher.cancel()
        assert await plugin.stop() == 0

    assert sum(e.kind == "register" for e in kubelet.events) == 1
    assert [e for e in kubelet.events if e.kind == "disconnected"][:-1] == []  # only the final stop
    assert kubelet.errors == []
    log = plugin.log()
    assert "Traceback" not in log and " ERROR " not in log
    reloads = log.count("nvdp.app: reloaded")
    assert 1 <= reloads <= SIGNALS  # signals that arrive during a reload are folded into the next one
