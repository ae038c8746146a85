"""Chaos: about 100 s of kubelet restarts, SIGHUPs (config rewritten, resources renamed), stalled
ListAndWatch readers and health events against the real console script, all mixed at random
(seeded); then the kubelet's view must equal the node's truth.

The node's truth is worked out independently of the running plugin: the device IDs from a fresh
`nvdp devices --json` run with the final config file, and the health from what was injected (a
fatal XID makes its GPU Unhealthy for good; transient and ignored XIDs leave it Healthy once the
quiet period has passed). The kubelet's view is the fake kubelet's: the resources registered with
the last kubelet, and the devices and health their ListAndWatch streams sent last.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nvdp.backends.simulated.control import request
from nvdp.testing import WAIT_S, FakeKubelet, eventually
from nvdp.testing.process import PluginProcess, StalledReader, open_fds

CHAOS_S = 100.0
SEED = 13
FATAL_GPUS = (0, 1, 2)  # XID 79 lands only here, so some GPUs stay healthy
# (replicas, renameByDefault): big lists (8,000-12,000 devices, 500-750 KB) so that a stalled
# reader's window fills with one message.
CONFIGS = ((1000, False), (1500, False), (1000, True))
FINAL = (1200, True)  # used only at the end: seeing it proves the last reload won
MAX_STALLED = 4
QUIET_S = 1.0
FD_SLACK = 12  # the stalled reader left, the new resource's socket, gRPC's pollers; a leak shows as hundreds


def write_config(path: Path, replicas: int, rename: bool) -> None:
    staging = path.with_suffix(".new")
    staging.write_text(
        f"version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: {str(rename).lower()}\n"
        f"    resources:\n    - name: nvidia.com/gpu\n      replicas: {replicas}\n"
    )
    os.replace(staging, path)  # atomically, as a ConfigMap update


def truth(config: Path, fatal: set[int]) -> dict[str, dict[str, str]]:
    """{resource: {device ID: health}} for the final config, from a separate `nvdp devices` run."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "nvdp"), "devices", "--simulate", "dgx-h100", f"--config-file={config}",
         "--json"], capture_output=True, text=True, check=True, timeout=WAIT_S).stdout
    resources = json.loads(out)["resources"]
    return {name: {d["id"]: "Unhealthy" if int(d["index"]) in fatal else "Healthy" for d in devices}
            for name, devices in resources.items()}


def kubelet_view(kubelet: FakeKubelet) -> dict[str, dict[str, str]]:
    return {name: {i: d.health for i, d in p.devices.items()} for name, p in kubelet.plugins.items() if p.connected}


@dataclass
class Chaos:
    plugin: PluginProcess
    kubelet: FakeKubelet
    folder: Path
    config: Path
    control: str
    rng: random.Random = field(default_factory=lambda: random.Random(SEED))
    fatal: set[int] = field(default_factory=set)
    stalled: list[StalledReader] = field(default_factory=list)
    done: Counter[str] = field(default_factory=Counter)

    async def inject(self, gpu: int, xid: int) -> None:
        reply = await asyncio.to_thread(request, self.control,
                                        {"command": "xid", "gpu": gpu, "xid": xid})
        assert reply["ok"], reply

    async def step(self) -> None:
        action = self.rng.choice(["restart", "sighup", "sighup", "stall", "stall", "unstall", "fatal",
                                  "transient", "transient", "ignored"])
        match action:
            case "restart":
                await self.kubelet.restart()
            case "sighup":
                write_config(self.config, *self.rng.choice(CONFIGS))
                self.plugin.signal(signal.SIGHUP)
            case "stall":
                sockets = [p for p in self.folder.glob("nvidia-*.sock") if p.is_socket()]
                if not sockets:
                    action = "stall (no socket right now)"
                else:
                    reader = StalledReader(str(self.rng.choice(sockets)))
                    try:
                        await reader.start(timeout=10)
                        self.stalled.append(reader)
                    except (RuntimeError, TimeoutError):  # the socket went away under it (a restart)
                        await reader.kill()
                        action = "stall (socket gone meanwhile)"
                    if len(self.stalled) > MAX_STALLED:
                        await self.stalled.pop(0).kill()
            case "unstall":
                if self.stalled:
                    await self.stalled.pop(self.rng.randrange(len(self.stalled))).kill()
            case "fatal":
                gpu = self.rng.choice(FATAL_GPUS)
                await self.inject(gpu, 79)
                self.fatal.add(gpu)
            case "transient":
                await self.inject(self.rng.randrange(8), 94)
            case "ignored":
                for _ in range(50):
                    await self.inject(self.rng.randrange(8), 13)
        self.done[action] += 1


@pytest.fixture
def elsewhere() -> Iterator[Path]:
    """A folder outside the kubelet's, which a kubelet restart wipes."""
    folder = Path(tempfile.mkdtemp(prefix="nvdp-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
async def test_chaos_then_the_kubelet_sees_the_truth(kubelet: FakeKubelet, plugin_dir: Path, elsewhere: Path) -> None:
    config = elsewhere / "config.yaml"
    control = str(elsewhere / "control.sock")
    write_config(config, *CONFIGS[0])
    args = ("--simulate", "dgx-h100", f"--config-file={config}", f"--simulate-control={control}",
            f"--health-quiet-period={QUIET_S}", "--health-probe-interval=1")
    plugin = PluginProcess(str(plugin_dir), args, log_path=str(elsewhere / "plugin.log"))
    chaos = Chaos(plugin, kubelet, plugin_dir, config, control)
    async with plugin:
        await kubelet.wait_registered("nvidia.com/gpu", timeout=WAIT_S, min_devices=8000)
        fds_before = open_fds(plugin.pid)
        try:
            end = time.monotonic() + CHAOS_S
            while time.monotonic() < end:
                await chaos.step()
                await asyncio.sleep(chaos.rng.uniform(0.05, 0.6))  # the pace of the chaos
                assert plugin.process is not None and plugin.process.returncode is None, plugin.log()[-3000:]

            # The end: one last config, one reader left stalled on the final resource.
            write_config(config, *FINAL)
            plugin.signal(signal.SIGHUP)
            expected = truth(config, chaos.fatal)
            final = next(iter(expected))
            await kubelet.wait_registered(final, timeout=WAIT_S, min_devices=len(expected[final]))
            last = StalledReader(str(plugin_dir / f"nvidia-{final.split('/')[1]}.sock"))
            await last.start()
            chaos.stalled.append(last)
            await eventually(lambda: kubelet_view(kubelet) == expected, "the kubelet's view to equal the truth",
                             timeout_s=WAIT_S)
            fds_after = open_fds(plugin.pid)
            sent = time.monotonic()
            code = await plugin.stop(timeout=WAIT_S)
            took = time.monotonic() - sent
        except BaseException:
            print(f"chaos steps so far: {dict(chaos.done)}\nthe plugin's log, last 20,000 characters:\n"
                  f"{plugin.log()[-20000:]}")
            raise
        finally:
            for reader in chaos.stalled:
                await reader.kill()
    log = plugin.log()
    print(f"chaos for {CHAOS_S:g} s: {dict(chaos.done)}; fatal GPUs {sorted(chaos.fatal)}; "
          f"{sum(len(v) for v in expected.values())} devices in {sorted(expected)}; "
          f"SIGTERM -> exit {code} in {took:.2f} s; "
          f"{log.count('its connection was closed')} stalled connections closed; open fds {fds_before} -> {fds_after}")
    assert code == 0, log[-3000:]
    assert "Traceback" not in log
    assert fds_after <= fds_before + FD_SLACK, (fds_before, fds_after)  # the forced closes leaked once
    assert kubelet.errors == []
