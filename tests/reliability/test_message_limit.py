"""The kubelet's 4 MiB limit on the ListAndWatch message: the largest lists still arrive whole;
one that can never fit is refused when planned (tests/unit/test_switching.py); one that grows over
the limit later (every device turns Unhealthy, a longer health string) is rejected by the kubelet,
and the plugin says so once, naming the fix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.options import Config
from nvdp.testing import WAIT_S, FakeKubelet
from tests.conftest import running_plugin
from tests.reliability.conftest import LogWatch

GPU = "nvidia.com/gpu"
TOO_LARGE = "device list too large"


def shared(plugin_dir: Path, replicas: int) -> str:
    path = plugin_dir / f"replicas-{replicas}.yaml"
    path.write_text(f"sharing:\n  timeSlicing:\n    resources: [{{name: {GPU}, replicas: {replicas}}}]\n")
    return str(path)


@pytest.mark.slow
async def test_a_list_just_under_the_limit_arrives_whole(
    kubelet: FakeKubelet, make_config: Callable[..., Config], plugin_dir: Path, logs: LogWatch
) -> None:
    # dgx-h100: about 64 bytes per replica, so 8 x 8,000 replicas is ~4.1 MB of the 4.19 MB limit.
    async with running_plugin(make_config("dgx-h100", config_file=shared(plugin_dir, 8000))):
        endpoint = await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=64_000)
        assert len(endpoint.devices) == 64_000 and endpoint.connected
    assert logs.count("nvdp.server", TOO_LARGE) == 0


@pytest.mark.slow
async def test_a_list_that_grows_over_the_limit_is_reported_once(
    kubelet: FakeKubelet, make_config: Callable[..., Config], plugin_dir: Path, logs: LogWatch
) -> None:
    # 8 x 8,000 replicas: 4,087,120 bytes healthy, 4,215,120 with every device "Unhealthy".
    logs.allowed = [TOO_LARGE, "device unhealthy"]
    async with running_plugin(make_config("dgx-h100", config_file=shared(plugin_dir, 8000))) as plugin:
        await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=64_000)
        assert isinstance(plugin.backend, SimulatedBackend)
        for gpu in range(8):
            plugin.backend.inject_xid(gpu, 79)  # fatal: every replica of every GPU turns Unhealthy
        await kubelet.wait_for(lambda: any(e.kind == "disconnected" for e in kubelet.events), WAIT_S)
        ended = next(e for e in kubelet.events if e.kind == "disconnected")
        assert "RESOURCE_EXHAUSTED" in ended.detail
        server = plugin.manager.servers[GPU]
        await server.update(server.resource)  # another version: still too large, no second line
        server.list_message()
    assert logs.count("nvdp.server", TOO_LARGE) == 1
    record = next(r for r in logs.records if r.getMessage().startswith(TOO_LARGE))
    assert record.__dict__["devices"] == 64_000 and record.__dict__["bytes"] > record.__dict__["limit"]
