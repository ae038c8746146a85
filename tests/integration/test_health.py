"""Health checking end to end: faults injected into the simulated node, seen through the fake kubelet."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from nvdp.app.health_monitor import PumpTuning
from nvdp.app.plugin import Plugin
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.cli import main
from nvdp.config.options import Config
from nvdp.core.health import EventKind, HealthEvent, ProbeSample
from nvdp.errors import DeviceError, EventWaitError, NvmlUnavailable
from nvdp.testing import FakeKubelet, eventually, stays_true
from nvdp.testing.fake_kubelet import PluginEndpoint
from tests.conftest import running_plugin

GPU = "nvidia.com/gpu"
MakeConfig = Callable[..., Config]
FAST = {"health_quiet_period": "0.2", "health_probe_interval": "0.05"}


def sim(plugin: Plugin) -> SimulatedBackend:
    assert isinstance(plugin.backend, SimulatedBackend)
    return plugin.backend


def health(endpoint: PluginEndpoint, device: str) -> str:
    return endpoint.devices[device].health


async def test_transient_xid_goes_unhealthy_then_healthy_again(
    kubelet: FakeKubelet, make_config: MakeConfig
) -> None:
    async with running_plugin(make_config("dgx-h100", **FAST)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=8)
        injected = time.monotonic()
        gpu = sim(plugin).inject_xid(3, 94).gpu
        await kubelet.wait_for(lambda: health(endpoint, gpu) == "Unhealthy")
        assert [i for i in endpoint.devices if health(endpoint, i) == "Unhealthy"] == [gpu]
        await kubelet.wait_for(lambda: health(endpoint, gpu) == "Healthy", timeout=5)
        assert time.monotonic() - injected >= 0.2  # not before the quiet period
        assert len(endpoint.healthy) == 8
    assert kubelet.errors == []


async def test_fatal_xid_stays_down_until_the_gpu_is_reset(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("dgx-h100", **FAST)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=8)
        gpu = sim(plugin).inject_xid(5, 79).gpu
        await kubelet.wait_for(lambda: health(endpoint, gpu) == "Unhealthy")
        probes = plugin.health.probes_run
        # Five quiet periods, about twenty passing probes: none of them brings a fatal fault back.
        await stays_true(lambda: health(endpoint, gpu) == "Unhealthy", 1.0, f"{gpu} Unhealthy after XID 79")
        assert plugin.health.probes_run >= probes + 5
        assert health(endpoint, gpu) == "Unhealthy"
        probes = plugin.health.probes_run
        sim(plugin).lose(5)
        # The second probe from now started after the loss (the first may have been under way).
        await eventually(lambda: plugin.health.probes_run >= probes + 2, "a probe that finds GPU 5 lost")
        sim(plugin).restore(5)  # lost, then back: NVML saw a reset
        await kubelet.wait_for(lambda: health(endpoint, gpu) == "Healthy", timeout=5)


async def test_lost_gpu_does_not_block_the_others(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("dgx-h100", **FAST)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=8)
        assert plugin.node is not None
        uuids = [g.uuid for g in plugin.node.gpus]
        sim(plugin).lose(2)
        await kubelet.wait_for(lambda: health(endpoint, uuids[2]) == "Unhealthy")
        assert endpoint.devices[uuids[2]].health == "Unhealthy"
        assert len(endpoint.healthy) == 7
        # Official plugin issue #2038: one lost GPU made every GetPreferredAllocation fail.
        for size in (1, 2, 4, 7):
            ids = await kubelet.preferred_allocation(GPU, uuids, [], size)
            assert len(ids) == size and uuids[2] not in ids
            response = await kubelet.allocate(GPU, ids)
            assert response.envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(ids)
        assert await kubelet.preferred_allocation(GPU, uuids, [], 8) == []  # cannot be met: no pick, no error
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kubelet.allocate(GPU, [uuids[1], uuids[2]])
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"unhealthy device: {uuids[2]} (GPU is lost: GPU is lost (simulated))" in (info.value.details() or "")
        sim(plugin).restore(2)
        await kubelet.wait_for(lambda: len(endpoint.healthy) == 8, timeout=5)


async def test_wait_error_storm_backs_off_marks_everything_and_recovers(
    kubelet: FakeKubelet, make_config: MakeConfig
) -> None:
    tuning = PumpTuning(backoff_first_s=0.01, backoff_max_s=0.02)
    cfg = make_config("dgx-h100", health_wait_error_threshold="3", health_probe_interval="0")
    async with running_plugin(cfg, health_tuning=tuning) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=8)
        updates = endpoint.updates
        started = time.monotonic()
        sim(plugin).fail_waits(20)
        await kubelet.wait_for(lambda: not endpoint.healthy)
        reason_seen = plugin.manager.tree[GPU].devices[0].reason
        assert reason_seen == "NVML event wait failed 3+ times in a row: nvmlEventSetWait: Unknown Error (simulated)"
        await kubelet.wait_for(lambda: len(endpoint.healthy) == 8, timeout=5)
        elapsed = time.monotonic() - started
        # 20 failures with back-off 0.01, 0.02, 0.02, ...: at least 0.39 s, not a busy loop.
        assert elapsed >= 0.35
        # The storm is two stream updates (down, up), not one per failure.
        assert endpoint.updates == updates + 2


async def test_every_replica_is_marked(kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path) -> None:
    config = plugin_dir / "config.yaml"
    config.write_text("version: v1\nsharing:\n  timeSlicing:\n    resources: [{name: nvidia.com/gpu, replicas: 4}]\n")
    async with running_plugin(make_config("pcie-l40s", config_file=str(config), **FAST)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=16)
        gpu = sim(plugin).inject_xid(1, 48).gpu
        replicas = {f"{gpu}::{n}" for n in range(4)}
        await kubelet.wait_for(lambda: {i for i, d in endpoint.devices.items() if d.health == "Unhealthy"} == replicas)
        assert len(endpoint.healthy) == 12


@pytest.mark.parametrize(
    ("env", "xid", "marked", "marker_xid"),
    [
        pytest.param({}, 13, False, 79, id="13 ignored by default"),
        pytest.param({"DP_ENABLE_HEALTHCHECKS": "13"}, 13, True, 79, id="enable=13"),
        pytest.param({"DP_DISABLE_HEALTHCHECKS": "79"}, 79, False, 48, id="disable=79"),
        pytest.param({"DP_DISABLE_HEALTHCHECKS": "all", "DP_ENABLE_HEALTHCHECKS": "48"}, 79, False, 48,
                     id="disable=all enable=48: 79 not watched"),
        pytest.param({"DP_DISABLE_HEALTHCHECKS": "all", "DP_ENABLE_HEALTHCHECKS": "48"}, 48, True, 48,
                     id="disable=all enable=48: 48 watched"),
    ],
)
async def test_dp_env_vars(
    kubelet: FakeKubelet, make_config: MakeConfig, env: dict[str, str], xid: int, marked: bool, marker_xid: int
) -> None:
    async with running_plugin(make_config("pcie-l40s", environ=env, **FAST)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=4)
        gpu = sim(plugin).inject_xid(0, xid).gpu
        marker = sim(plugin).inject_xid(1, marker_xid).gpu  # acted on, and handled after ours
        await kubelet.wait_for(lambda: health(endpoint, marker) == "Unhealthy")
        assert health(endpoint, gpu) == ("Unhealthy" if marked else "Healthy")


async def test_disable_all_watches_nothing(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    env = {"DP_DISABLE_HEALTHCHECKS": "all"}
    async with running_plugin(make_config("pcie-l40s", environ=env, **FAST)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=4)
        sim(plugin).inject_xid(0, 79)
        sim(plugin).lose(1)
        await stays_true(lambda: len(endpoint.healthy) == 4, 0.3, "every device Healthy with no checks watching")
        assert len(endpoint.healthy) == 4
        assert plugin.health.events_received == 0 and plugin.health.probes_run == 0


async def test_unknown_gpu_event_is_logged_not_fatal(
    kubelet: FakeKubelet, make_config: MakeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_plugin(make_config("pcie-l40s", **FAST)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=4)
        sim(plugin).inject(HealthEvent("GPU-not-here", EventKind.XID, xid=79))
        marker = sim(plugin).inject_xid(2, 79).gpu
        await kubelet.wait_for(lambda: health(endpoint, marker) == "Unhealthy")
        assert len(endpoint.healthy) == 3
    record = next(r for r in caplog.records if "does not serve" in r.getMessage())
    assert (record.levelno, record.__dict__["device"], record.__dict__["xid"]) == (logging.WARNING, "GPU-not-here", 79)


async def test_ecc_counter_rise_is_caught_by_the_probe(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("h200", **FAST)) as plugin:
        endpoint = await kubelet.wait_registered(GPU)
        (gpu,) = endpoint.devices
        await eventually(lambda: plugin.health.probes_run >= 1, "the first probe (it sets the baseline)")
        sim(plugin).raise_ecc(0, count=2)
        await kubelet.wait_for(lambda: health(endpoint, gpu) == "Unhealthy", timeout=5)
        assert plugin.manager.tree[GPU].devices[0].reason == (
            "volatile uncorrectable ECC errors rose from 0 to 2 (transient)"
        )
        await kubelet.wait_for(lambda: health(endpoint, gpu) == "Healthy", timeout=5)


async def test_each_transition_is_one_log_line_with_stable_fields(
    kubelet: FakeKubelet, make_config: MakeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nvdp.app")
    async with running_plugin(make_config("h200", **FAST)) as plugin:
        endpoint = await kubelet.wait_registered(GPU)
        (gpu,) = endpoint.devices
        sim(plugin).inject_xid(0, 94)
        await kubelet.wait_for(lambda: health(endpoint, gpu) == "Unhealthy")
        await kubelet.wait_for(lambda: health(endpoint, gpu) == "Healthy", timeout=5)
    lines = [r for r in caplog.records if r.name == "nvdp.app" and r.getMessage().startswith("device ")]
    assert [(r.getMessage(), r.__dict__["device"], r.__dict__["resource"], r.__dict__["xid"], r.__dict__["reason"])
            for r in lines] == [
        ("device unhealthy", gpu, GPU, 94, "XID 94: contained uncorrectable ECC error (transient)"),
        ("device healthy again", gpu, GPU, "-", "-"),
    ]


async def test_reload_keeps_a_fatal_fault(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    cfg = make_config("pcie-l40s", **FAST)
    async with running_plugin(cfg, reload_config=lambda: cfg) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=4)
        gpu = sim(plugin).inject_xid(0, 79).gpu
        await kubelet.wait_for(lambda: health(endpoint, gpu) == "Unhealthy")
        await plugin.reload()
        await stays_true(lambda: health(endpoint, gpu) == "Unhealthy", 0.3, f"{gpu} Unhealthy after the reload")
        assert health(endpoint, gpu) == "Unhealthy"


async def test_fault_injection_from_outside_through_the_cli(
    kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path
) -> None:
    control = str(plugin_dir / "control.sock")
    async with running_plugin(make_config("dgx-h100", simulate_control=control, **FAST)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=8)
        assert plugin.node is not None
        uuids = [g.uuid for g in plugin.node.gpus]
        runner = CliRunner()

        def inject(*args: str) -> tuple[int, str]:
            result = runner.invoke(main, ["simulate", "inject", "--control", control, *args])
            return result.exit_code, result.output

        code, output = await asyncio.to_thread(inject, "xid", "--gpu", "6", "--xid", "79")
        assert (code, output) == (0, f"XID 79 injected on {uuids[6]}\n")
        await kubelet.wait_for(lambda: health(endpoint, uuids[6]) == "Unhealthy")

        code, output = await asyncio.to_thread(inject, "lose", "--gpu", uuids[0])
        assert code == 0
        await kubelet.wait_for(lambda: health(endpoint, uuids[0]) == "Unhealthy")
        code, _ = await asyncio.to_thread(inject, "restore", "--gpu", "0")
        await kubelet.wait_for(lambda: health(endpoint, uuids[0]) == "Healthy")

        code, output = await asyncio.to_thread(inject, "xid", "--gpu", "12", "--xid", "79")
        assert (code, output) == (1, "error: no GPU 12 on the simulated node (indexes 0-7)\n")
        code, output = await asyncio.to_thread(inject, "wait-errors", "--count", "1")
        assert (code, output) == (0, "the next 1 event waits fail\n")
        code, output = await asyncio.to_thread(inject, "ecc", "--gpu", "1", "--remap-failed")
        assert code == 0
        await kubelet.wait_for(lambda: health(endpoint, uuids[1]) == "Unhealthy")
    assert not Path(control).exists()
    code, output = inject("lose", "--gpu", "0")
    assert code == 1 and "cannot talk to the control socket" in output


async def test_demo_shows_a_fatal_and_a_transient_xid() -> None:
    from nvdp.tools.demo import run_demo

    lines: list[str] = []
    await asyncio.wait_for(run_demo("dgx-h100", lines.append), 30)
    text = "\n".join(lines)
    assert "inject XID 79 on GPU 3 -> kubelet sees it Unhealthy" in text
    picked = re.search(r"GetPreferredAllocation\(size=4\) -> GPUs ([\d, ]+) \(", text)
    assert picked is not None and "3" not in picked.group(1).split(", ")
    assert "Allocate(GPU 3) -> INVALID_ARGUMENT" in text
    assert "GPU 5 Healthy again" in text
    assert "GPU 3 is still Unhealthy (XID 79 is fatal" in text
    assert "reset GPU 3" in text


async def test_a_new_backend_starts_without_the_old_wait_errors(
    kubelet: FakeKubelet, make_config: MakeConfig
) -> None:
    tuning = PumpTuning(backoff_first_s=0.01, backoff_max_s=0.01)
    cfg = make_config("pcie-l40s", health_wait_error_threshold="1", **FAST)
    current = {"cfg": cfg}
    async with running_plugin(cfg, reload_config=lambda: current["cfg"], health_tuning=tuning) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=4)
        old = sim(plugin)
        old.fail_waits(1_000_000)  # this backend's NVML never recovers
        await kubelet.wait_for(lambda: not endpoint.healthy)
        current["cfg"] = make_config("pcie-l40s", health_wait_error_threshold="1", container_driver_root="/other",
                                     **FAST)
        await plugin.reload()  # the driver root is a backend field: a new backend, a new event source
        assert sim(plugin) is not old
        await kubelet.wait_for(lambda: len(endpoint.healthy) == 4, timeout=5)


class ClosableSim(SimulatedBackend):
    """Behaves like NVML after nvmlShutdown: every probe and event wait fails once closed."""

    closed = False

    def close(self) -> None:
        self.closed = True
        super().close()

    def probe(self, gpus: Sequence[str]) -> Mapping[str, ProbeSample]:
        if self.closed:
            return {g: ProbeSample(reachable=False, error="Uninitialized") for g in gpus}
        return super().probe(gpus)

    def _next_event(self, timeout_s: float) -> HealthEvent | None:
        if self.closed:
            raise EventWaitError("nvmlEventSetWait: Uninitialized")
        return super()._next_event(timeout_s)


async def test_a_reload_whose_new_backend_fails_keeps_the_running_one(
    kubelet: FakeKubelet, make_config: MakeConfig
) -> None:
    opened: list[ClosableSim] = []

    def factory(cfg: Config) -> SimulatedBackend:
        if opened:  # the reload's backend: the new driver root has no NVML
            raise NvmlUnavailable("could not load NVML", ("/bad/usr/lib64/libnvidia-ml.so.1",))
        opened.append(ClosableSim(cfg.simulate or ""))
        return opened[0]

    cfg = make_config("pcie-l40s", **FAST)
    current = {"cfg": cfg}
    async with running_plugin(cfg, backend_factory=factory, reload_config=lambda: current["cfg"]) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=4)
        current["cfg"] = make_config("pcie-l40s", container_driver_root="/bad", **FAST)
        await plugin.reload()
        assert plugin.backend is opened[0] and not opened[0].closed
        assert plugin.cfg is cfg  # the running config is kept, too
        probes = plugin.health.probes_run
        # Ten probes: on a closed backend every one of them would have failed.
        await eventually(lambda: plugin.health.probes_run >= probes + 10, "ten more probes")
        assert len(endpoint.healthy) == 4
        gpu = opened[0].inject_xid(0, 94).gpu  # the health checks still watch the running backend
        await kubelet.wait_for(lambda: health(endpoint, gpu) == "Unhealthy")


class ProbeFails(SimulatedBackend):
    def probe(self, gpus: Sequence[str]) -> Mapping[str, ProbeSample]:
        raise DeviceError(gpus[0], "nvmlDeviceGetHandleByUUID: Unknown Error")


async def test_a_health_check_failure_propagates_as_itself(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    cfg = make_config("pcie-l40s", **FAST)
    plugin = Plugin(cfg, backend_factory=lambda c: ProbeFails(c.simulate or ""))
    with pytest.raises(DeviceError, match="Unknown Error"):  # not an ExceptionGroup: the CLI catches it by type
        await asyncio.wait_for(plugin.run(), 10)
