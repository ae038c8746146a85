"""Read-only checks on a real GPU: discovery and the whole plugin against the fake kubelet.

Run with `make gpu-test` on a GPU node; skipped elsewhere. Nothing here changes a GPU setting.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from nvdp.backends.nvml.discovery import NvmlBackend
from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.testing import FakeKubelet
from tests.conftest import running_plugin

pytestmark = pytest.mark.gpu


def test_discovery_matches_pynvml() -> None:
    import pynvml

    backend = NvmlBackend()
    try:
        node = backend.discover()
        assert len(node.gpus) == pynvml.nvmlDeviceGetCount()
        for gpu in node.gpus:
            handle = pynvml.nvmlDeviceGetHandleByIndex(gpu.index)
            assert gpu.uuid == pynvml.nvmlDeviceGetUUID(handle)
            assert re.fullmatch(r"GPU-[0-9a-f-]{36}", gpu.uuid)
            assert gpu.minor == pynvml.nvmlDeviceGetMinorNumber(handle)
            assert gpu.memory_bytes == pynvml.nvmlDeviceGetMemoryInfo(handle).total
            assert re.fullmatch(r"\d+\.\d+", gpu.compute_capability)
            assert gpu.pci_bus_id == pynvml.nvmlDeviceGetPciInfo(handle).busId
        assert node.driver_version
        assert "/dev/nvidiactl" in node.control_devices
    finally:
        backend.close()


async def test_plugin_on_real_gpus(plugin_dir: Path) -> None:
    cfg: Config = load({"kubelet_socket": str(plugin_dir / "kubelet.sock"), "pass_device_specs": "true"}, {})
    make: Callable[[Config], NvmlBackend] = lambda c: NvmlBackend(driver_root=c.container_driver_root)  # noqa: E731
    async with FakeKubelet(str(plugin_dir)) as kubelet, running_plugin(cfg, backend_factory=make) as plugin:
        endpoint = await kubelet.wait_registered("nvidia.com/gpu", timeout=30)
        assert plugin.node is not None
        assert list(endpoint.devices) == [g.uuid for g in plugin.node.gpus]
        first = plugin.node.gpus[0]
        response = await kubelet.allocate("nvidia.com/gpu", [first.uuid])
        assert response.envs["NVIDIA_VISIBLE_DEVICES"] == first.uuid
        assert f"/dev/nvidia{first.minor}" in [d.container_path for d in response.devices]
