"""Health operators can steer (issue 15): the XID policy from the config file, the driver's
recovery action, and NVML calls that hang, seen through the fake kubelet."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from nvdp.app.health_monitor import PumpTuning
from nvdp.app.plugin import Plugin
from nvdp.backends.nvml.discovery import NvmlBackend
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.cli import main
from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.testing import FakeKubelet, eventually, stays_true
from nvdp.testing.fake_kubelet import PluginEndpoint
from nvdp.testing.fake_nvml import h200_node
from tests.conftest import running_plugin

GPU = "nvidia.com/gpu"
MakeConfig = Callable[..., Config]
FAST = {"health_quiet_period": "0.2", "health_probe_interval": "0.05"}
# Long enough that a transient fault is still there when the kubelet sees the next update.
STEADY = {"health_quiet_period": "0.5", "health_probe_interval": "0.05"}
DEADLINE_S = 0.5
# Scheduling slack on a shared CI machine, on top of what the design promises.
SLACK_S = 1.5


def sim(plugin: Plugin) -> SimulatedBackend:
    assert isinstance(plugin.backend, SimulatedBackend)
    return plugin.backend


def health(endpoint: PluginEndpoint, device: str) -> str:
    return endpoint.devices[device].health


def reason(plugin: Plugin, device: str) -> str:
    return plugin.manager.tree[GPU].by_id[device].reason


def uuids(plugin: Plugin) -> list[str]:
    assert plugin.node is not None
    return [g.uuid for g in plugin.node.gpus]


POLICY = """version: v1
flags:
  nvdp:
    health:
      xids:
        94: {class: fatal, reason: we replace GPUs on the first contained ECC error}
        79: ignored
        13: transient
"""


@pytest.mark.parametrize(
    ("env", "fatal_94"),
    [pytest.param({}, True, id="config file"),
     pytest.param({"DP_DISABLE_HEALTHCHECKS": "94"}, False, id="DP_DISABLE_HEALTHCHECKS on top of the file")],
)
async def test_a_config_file_policy_changes_what_the_kubelet_sees(
    kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path, env: dict[str, str], fatal_94: bool
) -> None:
    config = plugin_dir / "config.yaml"
    config.write_text(POLICY)
    async with running_plugin(make_config("dgx-h100", environ=env, config_file=str(config), **STEADY)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=8)
        gpus = uuids(plugin)
        sim(plugin).inject_xid(1, 79)  # built-in fatal, ignored by the file
        sim(plugin).inject_xid(3, 13)  # built-in ignored, transient in the file
        sim(plugin).inject_xid(0, 94)  # built-in transient, fatal in the file
        marker = sim(plugin).inject_xid(2, 48).gpu  # acted on either way, handled after the others
        await kubelet.wait_for(lambda: health(endpoint, marker) == "Unhealthy")
        assert health(endpoint, gpus[1]) == "Healthy"
        assert health(endpoint, gpus[3]) == "Unhealthy"
        assert reason(plugin, gpus[3]) == "XID 13: graphics engine exception (transient)"
        await kubelet.wait_for(lambda: health(endpoint, gpus[3]) == "Healthy", timeout=5)  # after the quiet period
        if fatal_94:
            assert reason(plugin, gpus[0]) == "XID 94: we replace GPUs on the first contained ECC error (fatal)"
            probes = plugin.health.probes_run
            await stays_true(lambda: health(endpoint, gpus[0]) == "Unhealthy", 1.5, "XID 94 fatal: no recovery")
            assert plugin.health.probes_run >= probes + 5
        else:
            assert health(endpoint, gpus[0]) == "Healthy"


async def test_the_drivers_recovery_action_decides_the_class(
    kubelet: FakeKubelet, make_config: MakeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nvdp.healthwatch")
    async with running_plugin(make_config("dgx-h100", **STEADY)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=8)
        gpus = uuids(plugin)
        sim(plugin).inject_xid(4, 94, recovery_action=1)  # transient in the table; the driver wants a reset
        sim(plugin).inject_xid(5, 79, recovery_action=0)  # fatal in the table; the driver wants nothing
        await kubelet.wait_for(lambda: health(endpoint, gpus[4]) == "Unhealthy" == health(endpoint, gpus[5]))
        assert reason(plugin, gpus[4]) == (
            "XID 94: contained uncorrectable ECC error (fatal; the driver asks for gpu-reset)")
        await kubelet.wait_for(lambda: health(endpoint, gpus[5]) == "Healthy", timeout=5)  # transient: it recovers
        await stays_true(lambda: health(endpoint, gpus[4]) == "Unhealthy", 1.0, "a GPU waiting for its reset")
        counted = plugin.stats.snapshot().xid_recovery_actions
        assert counted == {(gpus[4], 94, "gpu-reset"): 1, (gpus[5], 79, "none"): 1}
        sim(plugin).restore(4)  # the reset: the driver now asks for nothing
        await kubelet.wait_for(lambda: health(endpoint, gpus[4]) == "Healthy", timeout=5)
    decided = [r for r in caplog.records if "recovery action decides" in r.getMessage()]
    assert {(r.__dict__["device"], r.__dict__["recovery_action"]) for r in decided} == {(gpus[4], 1), (gpus[5], 0)}


async def test_a_hung_probe_marks_its_gpu_within_the_deadline_and_health_goes_on(
    kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path
) -> None:
    control = str(plugin_dir / "control.sock")
    cfg = make_config("dgx-h100", simulate_control=control, health_nvml_timeout=str(DEADLINE_S), **FAST)
    runner = CliRunner()

    def inject(*args: str) -> tuple[int, str]:
        result = runner.invoke(main, ["simulate", "inject", "--control", control, *args])
        return result.exit_code, result.output

    async with running_plugin(cfg) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=8)
        gpus = uuids(plugin)
        started = time.monotonic()
        code, output = await asyncio.to_thread(inject, "hang", "--gpu", "3")
        assert (code, output) == (0, f"the probe of {gpus[3]} hang(s) until released\n")
        await kubelet.wait_for(lambda: health(endpoint, gpus[3]) == "Unhealthy", timeout=10)
        took = time.monotonic() - started
        assert took < DEADLINE_S + 0.05 + SLACK_S, f"{took:.2f} s: not within the deadline and one probe interval"
        assert reason(plugin, gpus[3]) == (
            f"nvml-timeout: health probe of {gpus[3]} did not return within {DEADLINE_S:g} s")
        assert len(endpoint.healthy) == 7
        # Health checking goes on: more probe rounds, events on other GPUs, one thread left behind.
        probes = plugin.health.probes_run
        await eventually(lambda: plugin.health.probes_run >= probes + 5, "five more probe rounds")
        assert plugin.health.stuck_threads == 1  # a stuck GPU is not probed again: no new thread per round
        assert plugin.stats.snapshot().nvml_timeouts == {"probe": 1}
        sim(plugin).inject_xid(5, 79)
        await kubelet.wait_for(lambda: health(endpoint, gpus[5]) == "Unhealthy")
        code, _ = await asyncio.to_thread(inject, "hang", "--release")
        assert code == 0
        await kubelet.wait_for(lambda: health(endpoint, gpus[3]) == "Healthy", timeout=5)
        await eventually(lambda: plugin.health.stuck_threads == 0, "the thread left behind to end")


async def test_a_hung_event_wait_marks_every_gpu_and_a_fresh_thread_takes_over(
    kubelet: FakeKubelet, make_config: MakeConfig
) -> None:
    tuning = PumpTuning(wait_timeout_s=0.1, watchdog_interval_s=0.05, backoff_first_s=0.01, backoff_max_s=0.05)
    cfg = make_config("dgx-h100", health_nvml_timeout=str(DEADLINE_S), **FAST)
    async with running_plugin(cfg, health_tuning=tuning) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=8)
        gpus = uuids(plugin)
        started = time.monotonic()
        sim(plugin).hang(events=True)
        await kubelet.wait_for(lambda: not endpoint.healthy, timeout=10)
        took = time.monotonic() - started
        assert took < 0.1 + DEADLINE_S + 0.05 + SLACK_S, f"{took:.2f} s"
        assert reason(plugin, gpus[0]).startswith("nvml-timeout: nvmlEventSetWait did not return within 0.6 s")
        probes = plugin.health.probes_run
        await eventually(lambda: plugin.health.probes_run >= probes + 3, "probes go on while the waits hang")
        # Every fresh event thread hangs too; no more than four are ever left behind.
        await eventually(lambda: plugin.health.event_threads_abandoned >= 2, "a fresh thread, stuck again")
        await stays_true(lambda: plugin.health.stuck_threads <= 4, 1.5, "a bounded number of stuck threads")
        sim(plugin).release()
        await kubelet.wait_for(lambda: len(endpoint.healthy) == 8, timeout=10)
        await eventually(lambda: plugin.health.stuck_threads == 0, "the threads left behind to end")
        assert plugin.stats.snapshot().nvml_timeouts["event-wait"] == plugin.health.event_threads_abandoned
        gpu = sim(plugin).inject_xid(6, 79).gpu  # events arrive again, on the fresh thread
        await kubelet.wait_for(lambda: health(endpoint, gpu) == "Unhealthy")


async def test_a_hung_nvml_call_in_the_fake_pynvml(kubelet: FakeKubelet, plugin_dir: Path) -> None:
    fake = h200_node(4)
    cfg = load({"kubelet_socket": str(plugin_dir / "kubelet.sock"), "health_nvml_timeout": str(DEADLINE_S), **FAST},
               {})
    async with running_plugin(cfg, backend_factory=lambda c: NvmlBackend(sysfs_root=str(plugin_dir), nvml=fake)):
        endpoint = await kubelet.wait_registered(GPU, min_devices=4)
        hung = fake.gpus[2].uuid
        fake.hang("nvmlDeviceGetHandleByUUID", gpu=hung)
        await kubelet.wait_for(lambda: health(endpoint, hung) == "Unhealthy", timeout=10)
        assert endpoint.devices.keys() - {hung} == set(endpoint.healthy)
        calls = len(fake.called("nvmlDeviceGetHandleByUUID"))
        await eventually(lambda: len(fake.called("nvmlDeviceGetHandleByUUID")) >= calls + 6,
                         "the other GPUs' probes going on")
        assert fake.hanging == 1
        fake.release()
        await kubelet.wait_for(lambda: len(endpoint.healthy) == 4, timeout=5)


def test_health_policy_prints_the_effective_table(plugin_dir: Path) -> None:
    config = plugin_dir / "config.yaml"
    config.write_text(POLICY + "      quietPeriods: {transient: 30, fatal: 3600}\n")
    env = {"DP_DISABLE_HEALTHCHECKS": "8", "DP_ENABLE_HEALTHCHECKS": "79"}
    result = CliRunner().invoke(main, ["health", "policy", "--config-file", str(config)], env=env)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split(maxsplit=2)[1:] for line in result.output.splitlines()[1:] if line}
    assert rows["94"][0] == "fatal" and rows["94"][1].endswith("config file (flags.nvdp.health.xids)")
    assert rows["79"][0] == "fatal" and rows["79"][1].endswith("DP_ENABLE_HEALTHCHECKS")
    assert rows["8"][0] == "ignored" and rows["8"][1].endswith("DP_DISABLE_HEALTHCHECKS")
    assert rows["13"][0] == "transient"
    assert "quiet period: transient 30 s; fatal 3600 s" in result.output
    as_json = CliRunner().invoke(main, ["health", "policy", "--json", "--config-file", str(config)], env=env)
    policy = json.loads(as_json.output)
    assert policy["quiet_periods_s"] == {"transient": 30.0, "fatal": 3600.0}
    assert {"xid": 94, "class": "fatal", "reason": "we replace GPUs on the first contained ECC error",
            "source": "config file (flags.nvdp.health.xids)"} in policy["xids"]
    config.write_text("version: v1\nflags: {nvdp: {health: {xids: {94: sometimes}}}}\n")
    bad = CliRunner().invoke(main, ["health", "policy", "--config-file", str(config)])
    assert bad.exit_code == 2 and f"invalid flags.nvdp.health.xids.94.class in {config}" in bad.output
