"""GetPreferredAllocation through the real gRPC server, asked by the fake kubelet as the kubelet asks."""

from __future__ import annotations

from collections.abc import Callable

from nvdp.config.options import Config
from nvdp.core.resources import GPU_RESOURCE
from nvdp.testing import FakeKubelet
from tests.conftest import running_plugin


async def test_kubelet_is_offered_the_best_sets(kubelet: FakeKubelet, make_config: Callable[..., Config]) -> None:
    async with running_plugin(make_config("dgx1-v100")) as plugin:
        endpoint = await kubelet.wait_registered(GPU_RESOURCE, min_devices=8)
        assert plugin.node is not None
        gpu = [g.uuid for g in plugin.node.gpus]
        free = list(reversed(endpoint.healthy))  # the order must not matter

        async def preferred(available: list[str], must: list[str], size: int) -> list[str]:
            return sorted(await kubelet.preferred_allocation(GPU_RESOURCE, available, must, size))

        assert await preferred(free, [], 2) == sorted([gpu[2], gpu[3]])  # NV2 + one PCIe switch: 250
        assert await preferred(free, [gpu[5]], 2) == sorted([gpu[5], gpu[6]])  # 230 beats 5-1's 210
        assert await preferred(free, [], 4) == sorted(gpu[:4])  # a whole quad: 1120
        # GPUs 4 and 5 busy: 2-3 and 6-7 tie at 250; 6-7 keeps the quad 0-3 whole for the next pod.
        rest = [u for u in free if u not in (gpu[4], gpu[5])]
        assert await preferred(rest, [], 2) == sorted([gpu[6], gpu[7]])
