"""200 kubelet restarts in a row, each followed by an allocation: nothing leaks, nothing is lost."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from nvdp.config.options import Config
from nvdp.testing import WAIT_S, FakeKubelet
from tests.conftest import running_plugin
from tests.reliability.conftest import LogWatch, open_fds

GPU = "nvidia.com/gpu"
RESTARTS = 200
WARM_UP = 10  # restarts before the baseline: gRPC creates its pollers and caches lazily
FD_SLACK = 8  # a leak of one descriptor per restart would show as ~190


@pytest.mark.slow
async def test_200_restarts_each_followed_by_an_allocation(
    kubelet: FakeKubelet, make_config: Callable[..., Config], plugin_dir: Path, logs: LogWatch
) -> None:
    async with running_plugin(make_config("dgx-h100")) as plugin:
        endpoint = await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
        ids = sorted(endpoint.devices)
        baseline_fds, baseline_files = 0, set()
        for i in range(RESTARTS):
            await kubelet.restart()
            endpoint = await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
            assert sorted(endpoint.devices) == ids
            device = ids[i % len(ids)]
            answer = await kubelet.allocate(GPU, [device])
            assert answer.envs["NVIDIA_VISIBLE_DEVICES"] == device
            if i == WARM_UP:
                baseline_fds, baseline_files = open_fds(), set(os.listdir(plugin_dir))
        assert open_fds() <= baseline_fds + FD_SLACK
        assert set(os.listdir(plugin_dir)) == baseline_files == {"kubelet.sock", "nvidia-gpu.sock"}
        assert plugin.manager.kubelet_restarts == RESTARTS
        assert plugin.manager.registrations == RESTARTS + 1
    assert kubelet.errors == []
    assert sum(e.kind == "register" for e in kubelet.events) == RESTARTS + 1
    assert sum(e.kind == "rejected" for e in kubelet.events) == 0
    # One line per restart, not one per folder event.
    assert logs.count("nvdp.manager", "kubelet restarted") == RESTARTS
