"""GetPreferredAllocation through the real gRPC server, asked by the fake kubelet as the kubelet asks."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator

import pytest

from nvdp.app import Plugin
from nvdp.config import load
from nvdp.resources import GPU_RESOURCE
from nvdp.testing import FakeKubelet


@pytest.fixture
async def cube_mesh() -> AsyncIterator[tuple[Plugin, FakeKubelet]]:
    # A short folder: unix socket paths are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="nvdp-") as folder:
        cfg = load({"simulate": "dgx1-v100", "kubelet_socket": f"{folder}/kubelet.sock"}, {})
        async with FakeKubelet(folder) as kubelet:
            plugin = Plugin(cfg)
            task = asyncio.create_task(plugin.run())
            try:
                await kubelet.wait_registered(GPU_RESOURCE, min_devices=8)
                yield plugin, kubelet
            finally:
                plugin.stop()
                await task


async def test_kubelet_is_offered_the_best_sets(cube_mesh: tuple[Plugin, FakeKubelet]) -> None:
    plugin, kubelet = cube_mesh
    assert plugin.node is not None
    gpu = [g.uuid for g in plugin.node.gpus]
    free = list(reversed(kubelet.plugin(GPU_RESOURCE).healthy))  # order must not matter

    assert sorted(await kubelet.preferred_allocation(GPU_RESOURCE, free, [], 2)) == sorted([gpu[2], gpu[3]])
    assert sorted(await kubelet.preferred_allocation(GPU_RESOURCE, free, [gpu[5]], 2)) == sorted([gpu[5], gpu[6]])
    four = await kubelet.preferred_allocation(GPU_RESOURCE, free, [], 4)
    assert sorted(four) == sorted(gpu[:4])
    # With GPUs 4 and 5 busy, 2-3 and 6-7 tie; 6-7 keeps the quad 0-3 whole for the next pod.
    rest = [u for u in free if u not in (gpu[4], gpu[5])]
    assert sorted(await kubelet.preferred_allocation(GPU_RESOURCE, rest, [], 2)) == sorted([gpu[6], gpu[7]])
