"""Read-only health checks on a real GPU: register events, wait, probe; the plugin's health loop.

Run with `make gpu-test` on a GPU node; skipped elsewhere. Registering for events and reading ECC
counters change nothing on the GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nvdp.backends.nvml.discovery import NvmlBackend
from nvdp.backends.nvml.health import event_mask
from nvdp.backends.nvml.seam import Nvml
from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.testing import FakeKubelet, eventually
from tests.conftest import running_plugin

pytestmark = pytest.mark.gpu


def test_events_register_and_a_quiet_wait_times_out() -> None:
    import pynvml

    backend = NvmlBackend()
    try:
        node = backend.discover()
        waiter = backend.watch_events(node)
        try:
            assert waiter.failures == {}
            for gpu in node.gpus:
                handle = pynvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
                supported = pynvml.nvmlDeviceGetSupportedEventTypes(handle)
                assert event_mask(Nvml(pynvml)) & supported, f"{gpu.uuid} supports none of the events we watch"
            # No XID expected on a healthy GPU: the wait must time out (None), not fail.
            assert waiter.wait(0.3) is None
        finally:
            waiter.close()
    finally:
        backend.close()


def test_probe_reads_every_gpu() -> None:
    backend = NvmlBackend()
    try:
        node = backend.discover()
        samples = backend.probe([g.uuid for g in node.gpus])
        assert set(samples) == {g.uuid for g in node.gpus}
        for uuid, sample in samples.items():
            assert sample.reachable and not sample.lost, (uuid, sample.error)
            assert sample.passing
            # Data-centre GPUs report ECC; row remapping exists from Ampere on (the H200 has it).
            assert sample.volatile_uncorrected is not None
            assert sample.remap_failed is not None
        assert backend.probe(["GPU-00000000-0000-0000-0000-000000000000"])[
            "GPU-00000000-0000-0000-0000-000000000000"
        ].lost
    finally:
        backend.close()


async def test_plugin_health_loop_on_real_gpus(plugin_dir: Path) -> None:
    cfg = load({"kubelet_socket": str(plugin_dir / "kubelet.sock"), "health_probe_interval": "0.2"}, {})

    def make(c: Config) -> NvmlBackend:
        return NvmlBackend(driver_root=cfg.container_driver_root)

    async with FakeKubelet(str(plugin_dir)) as kubelet, running_plugin(cfg, backend_factory=make) as plugin:
        endpoint = await kubelet.wait_registered("nvidia.com/gpu", timeout=30)
        await eventually(lambda: plugin.health.probes_run >= 3, "three health probes of the real GPUs")
        assert all(d.health == "Healthy" for d in endpoint.devices.values()), plugin.health.state.faults


def test_recovery_action_and_usage_on_a_real_gpu() -> None:
    """The driver's recovery action where it reports one (the H200 fixture: "None"), and what runs
    on an idle GPU: no compute process and, in the v2 memory info, nothing beyond the driver's
    reserve (so --gpu-hygiene's default threshold calls it clean)."""
    import pynvml

    from nvdp.core.hygiene import dirty_reason

    backend = NvmlBackend()
    try:
        node = backend.discover()
        for gpu in node.gpus:
            sample = backend.probe([gpu.uuid])[gpu.uuid]
            if int(node.driver_version.split(".")[0]) >= 580:  # the fixture's driver reports it
                assert sample.recovery_action == pynvml.NVML_GPU_RECOVERY_ACTION_NONE, (gpu.uuid, sample)
            usage = backend.usage(gpu.uuid)
            assert usage.memory_used_bytes is not None
            if not usage.pids:  # an idle GPU: clean for the default threshold
                assert dirty_reason(usage, 1024 * 2**20) == "", (gpu.uuid, usage)
    finally:
        backend.close()
