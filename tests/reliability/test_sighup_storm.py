"""A SIGHUP storm on the real process: 50 signals in 5 s, the config file rewritten before each.

The last config wins; the resource keeps its registration and its streams (the kubelet's and a
watcher's) through every reload, whether the reload changed its device list or only settings. On a
MIG-mixed node the storm changes only `nvidia.com/gpu` (the one GPU without MIG): the MIG resources
keep their registration and stream and get no message at all after the first.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet._proto import api_pb2_grpc as pb_grpc
from nvdp.testing import WAIT_S, FakeKubelet, eventually
from nvdp.testing.process import PluginProcess

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


@dataclass(frozen=True)
class Node:
    args: tuple[str, ...]
    gpus: int  # full GPUs under nvidia.com/gpu (each becomes `replicas` devices)
    unchanged: dict[str, int]  # resources the storm must not touch -> their device count


PLAIN = Node(("--simulate", "dgx-h100"), 8, {})
MIG_MIXED = Node(("--simulate", "a100-mig-mixed", "--mig-strategy", "mixed"), 1,
                 {"nvidia.com/mig-1g.5gb": 24, "nvidia.com/mig-2g.10gb": 3, "nvidia.com/mig-3g.20gb": 3})


@pytest.mark.slow
@pytest.mark.parametrize("node", [pytest.param(PLAIN, id="dgx-h100"), pytest.param(MIG_MIXED, id="a100 MIG mixed")])
async def test_sighup_storm_last_config_wins_and_streams_survive(
    kubelet: FakeKubelet, plugin_dir: Path, node: Node
) -> None:
    config = plugin_dir / "config.yaml"
    write_config(config, replicas=2, device_specs=False)
    plugin = PluginProcess(str(plugin_dir), (*node.args, f"--config-file={config}"))
    async with plugin:
        endpoint = await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=2 * node.gpus)
        untouched = {name: await kubelet.wait_registered(name, timeout=WAIT_S, min_devices=count)
                     for name, count in node.unchanged.items()}
        seen: list[int] = []
        watcher = asyncio.create_task(watch(str(plugin_dir / "nvidia-gpu.sock"), seen))
        await eventually(lambda: bool(seen), "the watcher's first message")

        for i in range(SIGNALS):
            last = i == SIGNALS - 1
            write_config(config, replicas=FINAL_REPLICAS if last else 2 + i % 3, device_specs=last or i % 2 == 0)
            plugin.signal(signal.SIGHUP)
            await asyncio.sleep(INTERVAL_S)  # the storm's pace is what is tested (50 signals in 5 s)

        final = node.gpus * FINAL_REPLICAS
        await kubelet.wait_for(lambda: len(endpoint.devices) == final, WAIT_S)
        await eventually(lambda: bool(seen) and seen[-1] == final, f"the watcher's last message: {final} devices")
        answer = await kubelet.allocate(GPU, sorted(endpoint.devices)[:1])
        assert "/dev/nvidiactl" in [d.container_path for d in answer.devices]  # passDeviceSpecs: true
        assert endpoint.connected and not watcher.done()  # both streams lived through the storm
        for name, held in untouched.items():
            assert held.connected and held.updates == 1, name  # no message since the first
            assert len(held.devices) == node.unchanged[name]
        watcher.cancel()
        stopping = time.monotonic()
        assert await plugin.stop() == 0

    for name in (GPU, *node.unchanged):
        assert sum(e.kind == "register" and e.resource == name for e in kubelet.events) == 1, name
    assert [e for e in kubelet.events if e.kind == "disconnected" and e.at < stopping] == []  # none before the stop
    assert kubelet.errors == []
    log = plugin.log()
    assert "Traceback" not in log and " ERROR " not in log
    reloads = log.count("nvdp.app: reloaded")
    assert 1 <= reloads <= SIGNALS  # signals that arrive during a reload are folded into the next one

