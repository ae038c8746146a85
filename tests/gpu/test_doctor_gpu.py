"""`nvdp doctor` and the metrics on a real GPU node (read-only; `make gpu-test`, skipped elsewhere)."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nvdp.app.discovery import open_backend
from nvdp.config.load import load
from nvdp.testing import FakeKubelet
from nvdp.tools.doctor import Doctor, Layout, Status
from tests.conftest import running_plugin

pytestmark = pytest.mark.gpu


async def test_doctor_sees_the_driver_and_every_gpu(kubelet: FakeKubelet) -> None:
    import pynvml

    cfg = load({"kubelet_socket": kubelet.socket_path}, {})
    doctor = Doctor(cfg, Layout.from_config(cfg), lambda: open_backend(cfg))
    results = {r.name: r for r in await doctor.run()}
    assert results["kernel-driver"].status is Status.PASS, results["kernel-driver"]
    assert results["nvml"].status is Status.PASS, results["nvml"]
    assert results["gpus"].status in (Status.PASS, Status.WARN), results["gpus"]
    assert len(results["gpus"].details) == pynvml.nvmlDeviceGetCount()
    assert results["device-nodes"].status in (Status.PASS, Status.WARN), results["device-nodes"]
    assert results["kubelet-socket"].status is Status.PASS


async def test_metrics_on_real_gpus(kubelet: FakeKubelet) -> None:
    cfg = load({"kubelet_socket": kubelet.socket_path, "metrics_address": "127.0.0.1:0"}, {})
    async with running_plugin(cfg) as plugin:
        await kubelet.wait_registered("nvidia.com/gpu")
        assert plugin.ops is not None and plugin.node is not None
        url = f"http://127.0.0.1:{plugin.ops.port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        node_info = [s for s in samples if s.name == "nvdp_node_info"]
        assert node_info and node_info[0].labels["backend"] == "nvml"
        assert node_info[0].labels["driver_version"] == plugin.node.driver_version
        devices = {s.labels["gpu_uuid"] for s in samples if s.name == "nvdp_device_healthy"}
        assert devices == {g.uuid for g in plugin.node.gpus}  # --mig-strategy=none: every GPU whole
