"""GPU hygiene before hand-out (--gpu-hygiene): PreStartContainer refuses a dirty exclusive GPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nvdp.app.plugin import Plugin
from nvdp.backends.nvml.discovery import NvmlBackend
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.testing import FakeKubelet
from nvdp.testing.fake_kubelet import KubeletError, PluginEndpoint
from nvdp.testing.fake_nvml import FakeProcess, h200_node
from tests.conftest import running_plugin

GPU = "nvidia.com/gpu"
MakeConfig = Callable[..., Config]
FAST = {"health_quiet_period": "0.2", "health_probe_interval": "0.05"}
HYGIENE = {"gpu_hygiene": "true", **FAST}


def sim(plugin: Plugin) -> SimulatedBackend:
    assert isinstance(plugin.backend, SimulatedBackend)
    return plugin.backend


def health(endpoint: PluginEndpoint, device: str) -> str:
    return endpoint.devices[device].health


def uuids(plugin: Plugin) -> list[str]:
    assert plugin.node is not None
    return [g.uuid for g in plugin.node.gpus]


async def test_off_by_default_pre_start_is_not_asked_for(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("pcie-l40s", **FAST)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=4)
        assert endpoint.options.pre_start_required is False
        sim(plugin).make_dirty(0, pids=[4242])
        with pytest.raises(KubeletError, match="did not ask for PreStartContainer"):
            await kubelet.pre_start(GPU, [uuids(plugin)[0]])


async def test_a_dirty_exclusive_gpu_fails_the_container_start(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("dgx-h100", **HYGIENE)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=8)
        assert endpoint.options.pre_start_required is True
        gpus = uuids(plugin)
        assert await kubelet.start_refusal(GPU, gpus[:2]) is None  # clean GPUs start
        sim(plugin).make_dirty(2, pids=[4242, 4243])
        sim(plugin).make_dirty(3, memory_mib=2048)
        sim(plugin).make_dirty(4, memory_mib=512)  # under the 1024 MiB threshold
        refusal = await kubelet.start_refusal(GPU, [gpus[2]])
        assert refusal == (
            f"FAILED_PRECONDITION: GPU hygiene (--gpu-hygiene) refused the container start: {gpus[2]}: "
            "2 compute processes running (pid 4242, 4243); the GPU stays Unhealthy until it is clean")
        await kubelet.wait_for(lambda: health(endpoint, gpus[2]) == "Unhealthy")
        assert plugin.manager.tree[GPU].by_id[gpus[2]].reason == "dirty: 2 compute processes running (pid 4242, 4243)"
        refusal = await kubelet.start_refusal(GPU, [gpus[3], gpus[4]])
        assert refusal is not None and "2048 MiB of memory in use (threshold 1024 MiB)" in refusal
        assert gpus[4] not in refusal
        await kubelet.wait_for(lambda: health(endpoint, gpus[3]) == "Unhealthy")
        assert health(endpoint, gpus[4]) == "Healthy"
        assert plugin.stats.snapshot().hygiene_refusals == {(GPU, gpus[2], "dirty"): 1, (GPU, gpus[3], "dirty"): 1}
        # Unhealthy until clean: the next probe after the clean-up brings it back.
        sim(plugin).clean(2)
        await kubelet.wait_for(lambda: health(endpoint, gpus[2]) == "Healthy", timeout=5)
        assert await kubelet.start_refusal(GPU, [gpus[2]]) is None
        assert health(endpoint, gpus[3]) == "Unhealthy"


async def test_shared_gpus_are_exempt(kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path) -> None:
    config = plugin_dir / "config.yaml"
    config.write_text("version: v1\nsharing:\n  timeSlicing:\n    resources: [{name: nvidia.com/gpu, replicas: 4}]\n")
    async with running_plugin(make_config("pcie-l40s", config_file=str(config), **HYGIENE)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=16)
        gpu = sim(plugin).make_dirty(1, pids=[4242])  # the replicas' other users run there by design
        assert await kubelet.start_refusal(GPU, [f"{gpu}::0", f"{gpu}::3"]) is None
        assert all(health(endpoint, f"{gpu}::{n}") == "Healthy" for n in range(4))


async def test_a_hung_check_answers_well_within_the_kubelets_deadline(
    kubelet: FakeKubelet, make_config: MakeConfig
) -> None:
    async with running_plugin(make_config("dgx-h100", health_nvml_timeout="0.5", **HYGIENE)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=8)
        gpus = uuids(plugin)
        sim(plugin).hang(5)
        started = time.monotonic()
        refusal = await kubelet.start_refusal(GPU, [gpus[5], gpus[6]])
        took = time.monotonic() - started
        assert took < 10, f"{took:.1f} s for PreStartContainer (the kubelet gives it 30 s)"
        assert refusal is not None and refusal.startswith("FAILED_PRECONDITION: GPU hygiene")
        # Either this check passed its deadline, or a probe of GPU 5 did first and is still stuck.
        assert f"nvml-timeout: GPU hygiene check of {gpus[5]}" in refusal
        await kubelet.wait_for(lambda: health(endpoint, gpus[5]) == "Unhealthy")
        assert plugin.manager.tree[GPU].by_id[gpus[5]].reason.startswith("nvml-timeout: ")
        assert plugin.stats.snapshot().hygiene_refusals == {(GPU, gpus[5], "nvml-timeout"): 1}
        sim(plugin).release()
        await kubelet.wait_for(lambda: health(endpoint, gpus[5]) == "Healthy", timeout=5)


async def test_processes_read_through_nvml(kubelet: FakeKubelet, plugin_dir: Path) -> None:
    fake = h200_node(2)
    cfg = load({"kubelet_socket": str(plugin_dir / "kubelet.sock"), **HYGIENE}, {})
    async with running_plugin(cfg, backend_factory=lambda c: NvmlBackend(sysfs_root=str(plugin_dir), nvml=fake)):
        endpoint = await kubelet.wait_registered(GPU, min_devices=2)
        idle, busy = (g.uuid for g in fake.gpus)
        fake.gpus[1].processes = (FakeProcess(31337, 2**30),)
        assert await kubelet.start_refusal(GPU, [idle]) is None  # 616 MiB reserved by the driver: clean
        refusal = await kubelet.start_refusal(GPU, [busy])
        assert refusal is not None and "1 compute process running (pid 31337)" in refusal
        await kubelet.wait_for(lambda: health(endpoint, busy) == "Unhealthy")
        fake.gpus[1].processes = ()
        await kubelet.wait_for(lambda: health(endpoint, busy) == "Healthy", timeout=5)
