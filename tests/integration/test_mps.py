"""MPS end to end on a simulated node: the simulated nvidia-cuda-mps-control and nvidia-smi as
real child processes, the MPS control daemon (in-process and as the console script), the plugin
against the strict fake kubelet, and the Allocate answer a pod gets."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from nvdp.app.mps import MpsTiming
from nvdp.app.mps_daemon import ControlDaemon, DaemonTiming
from nvdp.backends.mps import MpsControl
from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.core import mps
from nvdp.errors import MpsError
from nvdp.ops.readiness import readiness
from nvdp.testing import FakeKubelet, eventually
from nvdp.testing.mps import SimulatedMps
from nvdp.testing.process import console_script
from tests.conftest import running_plugin

GPU = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"
FAST_GATE = MpsTiming(first_s=0.05, max_s=0.2, recheck_s=0.1)
FAST_DAEMON = DaemonTiming(first_s=0.05, max_s=0.2, check_s=0.1)
SHARED_CONFIG = (f"version: v1\nsharing:\n  mps:\n    resources:\n"
                 f"    - {{name: {GPU}, replicas: 4, devices: [6, 7], rename: {SHARED}}}\n")


@pytest.fixture
def sim(plugin_dir: Path) -> Iterator[SimulatedMps]:
    simulated = SimulatedMps(plugin_dir)
    yield simulated
    simulated.kill_daemons()  # a test that failed half-way leaves none behind


@pytest.fixture
def mps_config(plugin_dir: Path, sim: SimulatedMps) -> Callable[..., Config]:
    def make(text: str = SHARED_CONFIG, **cli: Any) -> Config:
        path = plugin_dir / "config.yaml"
        path.write_text(text)
        values = {"simulate": "dgx-h100", "kubelet_socket": str(plugin_dir / "kubelet.sock"),
                  "config_file": str(path), **sim.settings(), **cli}
        return load(values, {})

    return make


def uuids(*indexes: int) -> list[str]:
    from nvdp.backends.simulated.backend import SimulatedBackend

    gpus = SimulatedBackend("dgx-h100").discover().gpus
    return [gpus[i].uuid for i in indexes]


def told(sim: SimulatedMps, resource: str = SHARED) -> list[str]:
    """What the resource's daemon was told, readiness checks left out."""
    return [c for c in sim.state(resource)["commands"] if c != mps.READINESS_COMMAND]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        status = Path(f"/proc/{pid}/status").read_text()
    except (ProcessLookupError, FileNotFoundError):  # gone, or reaped between the two looks
        return False
    return "zombie" not in status


@asynccontextmanager
async def control_daemon(cfg: Config, timing: DaemonTiming = FAST_DAEMON) -> AsyncIterator[ControlDaemon]:
    daemon = ControlDaemon(cfg, timing=timing)
    task = asyncio.create_task(daemon.run())
    try:
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 60)


# --- the control program ---------------------------------------------------------------------------


async def test_a_control_command_runs_with_only_the_two_mps_variables(sim: SimulatedMps) -> None:
    out = await MpsControl("env", str(sim.root)).ask(GPU, [mps.READINESS_COMMAND])
    assert sorted(out.splitlines()) == [f"CUDA_MPS_LOG_DIRECTORY={sim.root}/nvidia.com/gpu/log",
                                        f"CUDA_MPS_PIPE_DIRECTORY={sim.root}/nvidia.com/gpu/pipe"]


async def test_readiness_check_reasons(sim: SimulatedMps) -> None:
    missing = await MpsControl(sim.control, str(sim.root)).probe(GPU)
    assert missing is not None and "exited with status 1: Cannot find MPS control daemon process" in missing
    absent = await MpsControl("/nonexistent/nvidia-cuda-mps-control", str(sim.root)).probe(GPU)
    assert absent == "cannot run /nonexistent/nvidia-cuda-mps-control: No such file or directory"
    hung = await MpsControl("sleep 30", str(sim.root), timeout=0.3).probe(GPU)
    assert hung == "sleep did not finish within 0.3 s"


async def test_a_cancelled_check_leaves_no_child_behind(sim: SimulatedMps, plugin_dir: Path) -> None:
    pid_file = plugin_dir / "child.pid"
    control = MpsControl(f"sh -c 'echo $$ > {pid_file}; exec sleep 300'", str(sim.root), timeout=600)
    check = asyncio.create_task(control.probe(GPU))
    await eventually(lambda: pid_file.exists() and pid_file.read_text().strip() != "", "the child runs")
    pid = int(pid_file.read_text())
    check.cancel()
    with pytest.raises(asyncio.CancelledError):
        await check
    try:
        await eventually(lambda: not alive(pid), "the cancelled check's child is gone", timeout_s=10)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


async def test_the_simulated_control_program_speaks_the_protocol(sim: SimulatedMps) -> None:
    control = MpsControl(sim.control, str(sim.root))
    await control.start_daemon(GPU)
    with pytest.raises(MpsError, match="An instance of this daemon is already running"):
        await control.start_daemon(GPU)
    assert (await control.ask(GPU, [mps.READINESS_COMMAND])).strip() == "100.0"
    answer = await control.ask(GPU, ["set_default_active_thread_percentage 25",
                                     "set_default_device_pinned_mem_limit 0 1024M", mps.READINESS_COMMAND,
                                     "get_default_device_pinned_mem_limit 0", "bogus"])
    assert answer.splitlines() == ["25.0", "1024M", "Invalid command: bogus"]
    pid = sim.daemon_pid(GPU)
    assert pid is not None and alive(pid)
    await control.ask(GPU, [mps.QUIT_COMMAND])
    await eventually(lambda: not alive(pid), "the daemon exits on quit")
    log = (sim.log(GPU) / "control.log").read_text()
    assert f"Control {pid}] Starting control daemon using socket {sim.pipe(GPU)}/control" in log
    assert "Cmd:set_default_active_thread_percentage 25" in log and log.rstrip().endswith("Exit")
    assert await control.probe(GPU) is not None


# --- the MPS control daemon ---------------------------------------------------------------------------


async def test_daemon_start_sequence_and_stop(mps_config: Callable[..., Config], sim: SimulatedMps) -> None:
    u6, u7 = uuids(6, 7)
    cfg = mps_config()
    async with control_daemon(cfg) as daemon:
        await asyncio.wait_for(daemon.ready.wait(), 60)
        assert sim.compute_modes() == {u6: "EXCLUSIVE_PROCESS", u7: "EXCLUSIVE_PROCESS"}
        assert told(sim) == ["set_default_device_pinned_mem_limit 6 20389M",
                             "set_default_device_pinned_mem_limit 7 20389M",
                             "set_default_active_thread_percentage 25"]
        assert sim.state(SHARED)["active_thread_percentage"] == 25.0
        assert (sim.root / SHARED / ".started").exists() and (sim.root / ".ready").exists()
        assert "Starting control daemon" in (sim.log(SHARED) / "control.log").read_text()
        pid = sim.daemon_pid(SHARED)
        assert pid is not None and alive(pid)
        assert not (sim.root / GPU).exists()  # the exclusive GPUs get no daemon
    assert told(sim)[-1] == "quit"
    await eventually(lambda: not alive(pid), "the daemon has quit")
    assert sim.compute_modes() == {u6: "DEFAULT", u7: "DEFAULT"}
    from nvdp.backends.simulated.nvidia_smi import read_state

    assert read_state(sim.smi_state)["calls"] == [f"-i {u6} -c EXCLUSIVE_PROCESS", f"-i {u7} -c EXCLUSIVE_PROCESS",
                                                  f"-i {u6} -c DEFAULT", f"-i {u7} -c DEFAULT"]
    assert not (sim.root / SHARED / ".started").exists() and not (sim.root / ".ready").exists()
    assert not sim.log(SHARED).exists()


async def test_a_daemon_that_dies_is_started_again(mps_config: Callable[..., Config], sim: SimulatedMps) -> None:
    async with control_daemon(mps_config()) as daemon:
        await asyncio.wait_for(daemon.ready.wait(), 60)
        first = sim.daemon_pid(SHARED)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: daemon.restarts == 1, "the supervisor started the daemon again")
        second = sim.daemon_pid(SHARED)
        assert second is not None and second != first and alive(second)
        assert told(sim) == ["set_default_device_pinned_mem_limit 6 20389M",  # the new daemon's own state
                             "set_default_device_pinned_mem_limit 7 20389M",
                             "set_default_active_thread_percentage 25"]
        await asyncio.wait_for(daemon.ready.wait(), 30)


async def test_a_failed_start_is_retried_with_back_off(
    mps_config: Callable[..., Config], sim: SimulatedMps, caplog: pytest.LogCaptureFixture
) -> None:
    sim.pipe(SHARED).mkdir(parents=True)
    (sim.pipe(SHARED) / "sim-fail-starts").write_text("2")
    with caplog.at_level(logging.INFO, "nvdp.mpsdaemon"):
        async with control_daemon(mps_config()) as daemon:
            await asyncio.wait_for(daemon.ready.wait(), 60)
            assert daemon.start_failures == 2
    failures = [r for r in caplog.records if r.getMessage().startswith("MPS control daemons failed to start")]
    assert [r.retry_s for r in failures] == [0.05, 0.1]  # type: ignore[attr-defined]
    assert "simulated start failure" in failures[0].error  # type: ignore[attr-defined]


async def test_sighup_restarts_the_daemons(mps_config: Callable[..., Config], sim: SimulatedMps) -> None:
    async with control_daemon(mps_config()) as daemon:
        await asyncio.wait_for(daemon.ready.wait(), 60)
        first = sim.daemon_pid(SHARED)
        daemon.request_restart()
        await eventually(lambda: sim.daemon_pid(SHARED) not in (None, first) and daemon.ready.is_set(),
                         "a new daemon after the restart")
        assert first is not None and not alive(first)


async def test_no_mps_in_the_config_starts_nothing(mps_config: Callable[..., Config], sim: SimulatedMps) -> None:
    cfg = mps_config("version: v1\n")
    async with control_daemon(cfg) as daemon:
        await asyncio.sleep(0)
        assert daemon.running == {}
    assert not sim.root.exists()


# --- the plugin ---------------------------------------------------------------------------------------


async def test_the_mps_resource_waits_for_its_daemon(
    kubelet: FakeKubelet, mps_config: Callable[..., Config], sim: SimulatedMps, plugin_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = plugin_dir / "calls"
    failing = f"sh -c 'echo x >> {calls}; echo daemon not here; exit 1'"
    with caplog.at_level(logging.INFO, "nvdp.mps"):
        async with running_plugin(mps_config(mps_control=failing), mps_timing=FAST_GATE) as plugin:
            exclusive = await kubelet.wait_registered(GPU)
            assert list(exclusive.devices) == uuids(0, 1, 2, 3, 4, 5)
            await eventually(lambda: calls.exists() and len(calls.read_text().split()) >= 4, "several checks")
            assert SHARED not in kubelet.plugins and SHARED not in plugin.manager.servers
            why = plugin.view.state().mps[SHARED]
            assert why == f"sh -c echo x >> {calls}; echo daemon not here; exit 1 exited with status 1: daemon not here"
            probe = readiness(plugin.view.state())
            assert not probe.ok and f"[-]mps:{SHARED} failed: {why}" in probe.text()
    warnings = [r for r in caplog.records if r.name == "nvdp.mps" and r.levelno == logging.WARNING]
    assert len(warnings) == 1  # the same reason on every retry: logged once
    assert warnings[0].reason == why  # type: ignore[attr-defined]
    assert "asking again after 0.05 s, backing off to 0.2 s" in warnings[0].getMessage()


async def test_daemon_plugin_and_pods_end_to_end(
    kubelet: FakeKubelet, mps_config: Callable[..., Config], sim: SimulatedMps
) -> None:
    u6, u7 = uuids(6, 7)
    cfg = mps_config()
    async with running_plugin(cfg, mps_timing=FAST_GATE) as plugin:
        await kubelet.wait_registered(GPU)
        assert SHARED not in kubelet.plugins
        async with control_daemon(cfg):
            shared = await kubelet.wait_registered(SHARED, min_devices=8)
            assert list(shared.devices) == [f"{u}::{n}" for u in (u6, u7) for n in range(4)]
            assert shared.endpoint == "nvidia-gpu.shared.sock"
            assert len(kubelet.plugin(GPU).devices) == 6
            assert plugin.view.state().mps == {SHARED: ""}

            chosen, response = await kubelet.admit(SHARED, 1)
            (device,) = chosen
            gpu = device.split("::")[0]
            assert dict(response.envs) == {"CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu.shared/pipe",
                                           "NVIDIA_VISIBLE_DEVICES": gpu}
            assert [(m.container_path, m.host_path, m.read_only) for m in response.mounts] == [
                ("/mps/nvidia.com/gpu.shared/pipe", f"{sim.root}/nvidia.com/gpu.shared/pipe", False),
                ("/dev/shm", f"{sim.root}/shm", False)]
            assert list(response.devices) == [] and dict(response.annotations) == {}
            second, _ = await kubelet.admit(SHARED, 1)
            assert second[0].split("::")[0] != gpu  # distributed: the other GPU first

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await kubelet.admit(SHARED, 2)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == ('invalid allocation request for "nvidia.com/gpu.shared": invalid '
                                               "request: maximum request size for shared resources is 1; found 2")
            _, exclusive = await kubelet.admit(GPU, 2)
            assert "CUDA_MPS_PIPE_DIRECTORY" not in exclusive.envs and list(exclusive.mounts) == []
        await kubelet.wait_for(lambda: not kubelet.plugins[SHARED].connected, timeout=30)
        assert SHARED not in plugin.manager.servers and kubelet.plugin(GPU).connected
    assert kubelet.errors == []


async def test_a_daemon_that_stops_answering_takes_its_resource_down_until_it_answers(
    kubelet: FakeKubelet, mps_config: Callable[..., Config], sim: SimulatedMps
) -> None:
    cfg = mps_config()
    control = MpsControl(cfg.mps_control, cfg.mps_dir)
    sim.pipe(SHARED).mkdir(parents=True)
    sim.log(SHARED).mkdir(parents=True)
    await control.start_daemon(SHARED)
    async with running_plugin(cfg, mps_timing=FAST_GATE) as plugin:
        await kubelet.wait_registered(SHARED, min_devices=8)
        pid = sim.daemon_pid(SHARED)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await kubelet.wait_for(lambda: not kubelet.plugins[SHARED].connected, timeout=30)
        assert SHARED not in plugin.manager.servers and plugin.view.state().mps[SHARED] != ""
        assert not (Path(cfg.kubelet_socket).parent / "nvidia-gpu.shared.sock").exists()
        await control.start_daemon(SHARED)
        await kubelet.wait_registered(SHARED, min_devices=8)
        assert plugin.view.state().mps == {SHARED: ""}
        await control.ask(SHARED, [mps.QUIT_COMMAND])


async def test_a_reload_whose_sharing_does_not_fit_the_node_keeps_the_running_config(
    kubelet: FakeKubelet, mps_config: Callable[..., Config], plugin_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = mps_config("version: v1\n")
    bad = mps_config(f"version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - {{name: {GPU}, replicas: 2, "
                     "devices: [8]}\n")
    async with running_plugin(good, reload_config=lambda: bad) as plugin:
        await kubelet.wait_registered(GPU, min_devices=8)
        with caplog.at_level(logging.ERROR, "nvdp.app"):
            await plugin.reload()
        assert plugin.cfg is good and len(plugin.manager.tree[GPU].devices) == 8
        (record,) = [r for r in caplog.records if "keeping the running config" in r.getMessage()]
        error = record.error  # type: ignore[attr-defined]
        assert "sharing.timeSlicing.resources.0.devices in " in error and ": no matching device at index: 8" in error


# --- the console scripts ------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("NVDP_", "CUDA_MPS_", "CONFIG_FILE", "MPS_"))}


@pytest.mark.parametrize(
    ("config", "field", "message"),
    [
        pytest.param(f"    - {{name: {GPU}, replicas: 4, devices: [9], rename: {SHARED}}}\n",
                     "sharing.mps.resources.0.devices", "no matching device at index: 9", id="no such index"),
        pytest.param(f"    - {{name: {GPU}, replicas: 49}}\n", "sharing.mps.resources.0.replicas",
                     "exceed the 48 MPS clients", id="above the client limit"),
    ],
)
def test_a_sharing_config_that_does_not_fit_the_node_exits_2_before_any_socket(
    plugin_dir: Path, sim: SimulatedMps, config: str, field: str, message: str
) -> None:
    path = plugin_dir / "config.yaml"
    path.write_text(f"version: v1\nsharing:\n  mps:\n    resources:\n{config}")
    result = subprocess.run(
        [console_script(), "--simulate", "dgx-h100", "--config-file", str(path), "--mps-root", str(sim.root),
         "--kubelet-socket", str(plugin_dir / "kubelet.sock")],
        env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"invalid {field} in {path}: " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(plugin_dir.glob("*.sock"))


def test_the_mps_daemon_exits_2_on_a_config_the_node_cannot_satisfy(plugin_dir: Path, sim: SimulatedMps) -> None:
    path = plugin_dir / "config.yaml"
    path.write_text(f"sharing:\n  mps:\n    resources: [{{name: {GPU}, replicas: 4, devices: [0, 1]}}]\n")
    result = subprocess.run(
        [console_script("mps-control-daemon"), "--simulate", "dgx-h100", "--config-file", str(path),
         "--mps-dir", str(sim.root), "--mps-control", sim.control, "--nvidia-smi", sim.nvidia_smi],
        env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"invalid sharing.mps.resources.0.rename in {path}: devices shares only some GPUs" in result.stderr
    assert not sim.root.exists() and not sim.smi_state.exists()  # nothing was started


def test_mps_without_mps_root_exits_2(plugin_dir: Path) -> None:
    path = plugin_dir / "config.yaml"
    path.write_text(f"sharing:\n  mps:\n    resources: [{{name: {GPU}, replicas: 2}}]\n")
    result = subprocess.run([console_script(), "--simulate", "dgx-h100", "--config-file", str(path)],
                            env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid --mps-root: using MPS requires --mps-root to be specified" in result.stderr


async def test_the_mps_control_daemon_console_script(plugin_dir: Path, sim: SimulatedMps) -> None:
    path = plugin_dir / "config.yaml"
    path.write_text(SHARED_CONFIG)
    args = [console_script("mps-control-daemon"), "--simulate", "dgx-h100", "--config-file", str(path),
            "--mps-dir", str(sim.root), "--mps-control", sim.control, "--nvidia-smi", sim.nvidia_smi]
    proc = await asyncio.create_subprocess_exec(*args, env=_env(), stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    try:
        await eventually(lambda: (sim.root / ".ready").exists(), "the daemons are started", timeout_s=60)
        first = sim.daemon_pid(SHARED)
        proc.send_signal(signal.SIGHUP)
        await eventually(lambda: sim.daemon_pid(SHARED) not in (None, first) and (sim.root / ".ready").exists(),
                         "SIGHUP restarted the daemon", timeout_s=60)
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, out.decode()
    assert set(sim.compute_modes().values()) == {"DEFAULT"}
    text = out.decode()
    assert "MPS control daemon started" in text and "control.log: [" in text and "SIGHUP" in text


def test_mount_shm(plugin_dir: Path, sim: SimulatedMps) -> None:
    record = plugin_dir / "mount-args"
    meminfo = plugin_dir / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\n")
    mountinfo = plugin_dir / "mountinfo"
    mountinfo.write_text("22 1 0:21 / /proc rw - proc proc rw\n")
    fake_mount = f"sh -c 'echo \"$@\" > {record}' mount"
    args = [console_script("mps-control-daemon"), "--mps-dir", str(sim.root), "mount-shm", "--mount", fake_mount,
            "--meminfo", str(meminfo), "--mountinfo", str(mountinfo)]
    result = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    target = sim.root / "shm"
    assert result.stdout.strip() == f"mounted a tmpfs of 8000000k at {target}"
    assert record.read_text().split() == ["-t", "tmpfs", "-o", "rw,nosuid,nodev,noexec,relatime,size=8000000k",
                                          "tmpfs", str(target)]
    record.unlink()
    mountinfo.write_text(f"22 1 0:21 / {target} rw - tmpfs tmpfs rw\n")
    again = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == f"{target} is already mounted" and not record.exists()
    failing = subprocess.run([*args[:4], "--mount", "false", *args[6:]], env=_env(), capture_output=True, text=True,
                             timeout=60)
    assert failing.returncode == 0  # still mounted: nothing to do
    mountinfo.write_text("")
    failing = subprocess.run([*args[:4], "--mount", "false", *args[6:]], env=_env(), capture_output=True, text=True,
                             timeout=60)
    assert failing.returncode == 1 and "mount of the MPS shared memory" in failing.stderr


def test_nvdp_demo_sharing_mps() -> None:
    result = subprocess.run([console_script("nvdp"), "demo", "--sharing", "mps"], env=_env(), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"{SHARED} held back, not registered" in out
    assert "set_default_device_pinned_mem_limit 6 20389M; set_default_device_pinned_mem_limit 7 20389M; " \
           "set_default_active_thread_percentage 25" in out
    assert "CUDA_MPS_PIPE_DIRECTORY=/mps/nvidia.com/gpu.shared/pipe" in out
    assert "maximum request size for shared resources is 1; found 2" in out
    assert "demo done" in out



