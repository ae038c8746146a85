"""What the cluster sees (--cluster-health): the real plugin on a simulated node reporting to the
in-memory cluster (tests/integration/test_kube_wiring.py runs it on the real client and the fake
API server)."""

from __future__ import annotations

from collections.abc import Callable

from nvdp.app.plugin import Plugin
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.options import Config
from nvdp.core.backoff import Backoff
from nvdp.ops.cluster import TAINT_KEY
from nvdp.testing import FakeKubelet, eventually
from nvdp.testing.fake_cluster import InMemoryCluster
from tests.conftest import running_plugin

GPU = "nvidia.com/gpu"
NODE = "gpu-node-7"
MakeConfig = Callable[..., Config]
STEADY = {"health_quiet_period": "0.5", "health_probe_interval": "0.05"}


def sim(plugin: Plugin) -> SimulatedBackend:
    assert isinstance(plugin.backend, SimulatedBackend)
    return plugin.backend


def condition(cluster: InMemoryCluster) -> dict[str, str]:
    return cluster.condition("GPUHealthy") or {}


async def test_events_condition_and_taint_follow_gpu_health(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    cluster = InMemoryCluster(NODE)
    cfg = make_config("dgx-h100", cluster_health="true", taint_on_fatal="true", node_name=NODE, **STEADY)
    async with running_plugin(cfg, cluster_api=cluster) as plugin:
        await kubelet.wait_registered(GPU, min_devices=8)
        await cluster.wait_for(lambda: condition(cluster).get("status") == "True")
        assert condition(cluster)["message"] == "all 8 GPUs healthy" and cluster.events == []
        fatal = sim(plugin).inject_xid(3, 79).gpu
        await cluster.wait_for(lambda: condition(cluster).get("status") == "False" and bool(cluster.taints))
        (event,) = cluster.events_with("GPUUnhealthy")
        assert event["type"] == "Warning" and event["involvedObject"]["name"] == NODE
        assert event["metadata"]["annotations"] == {"nvidia.com/gpu-uuid": fatal, "nvidia.com/xid": "79",
                                                    "nvidia.com/recovery-expected": "false"}
        assert "XID 79: GPU has fallen off the bus (fatal)" in event["message"]
        assert condition(cluster)["message"].startswith("1 of 8 GPUs unhealthy: GPU 3 ")
        assert cluster.taints == [{"key": TAINT_KEY, "value": "1", "effect": "NoSchedule"}]
        assert cluster.condition("Ready") is not None  # the kubelet's conditions stay

        transient = sim(plugin).inject_xid(5, 94).gpu
        await cluster.wait_for(lambda: len(cluster.events_with("GPUUnhealthy")) == 2)
        second = cluster.events_with("GPUUnhealthy")[1]
        assert second["metadata"]["annotations"]["nvidia.com/gpu-uuid"] == transient
        assert second["metadata"]["annotations"]["nvidia.com/recovery-expected"] == "true"
        await cluster.wait_for(lambda: condition(cluster)["message"].startswith("2 of 8 GPUs unhealthy"))
        await cluster.wait_for(lambda: len(cluster.events_with("GPUHealthy")) == 1, timeout=5)  # XID 94 is over
        assert cluster.events_with("GPUHealthy")[0]["type"] == "Normal"
        probes = plugin.health.probes_run
        sim(plugin).lose(3)
        await eventually(lambda: plugin.health.probes_run >= probes + 2, "a probe that finds GPU 3 lost")
        sim(plugin).restore(3)  # lost, then back: a reset, the fatal XID clears
        await cluster.wait_for(lambda: condition(cluster).get("status") == "True" and not cluster.taints, timeout=5)
        assert plugin.cluster is not None and not plugin.cluster.pending
        counted = plugin.stats.snapshot().cluster_updates
        assert counted[("event", "ok")] == len(cluster.events) and ("event", "error") not in counted


async def test_an_api_away_does_not_hold_up_the_kubelet(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    cluster = InMemoryCluster(NODE)
    cluster.fail_next(1_000)
    cfg = make_config("pcie-l40s", cluster_health="true", node_name=NODE, **STEADY)
    async with running_plugin(cfg, cluster_api=cluster, cluster_retry=Backoff(0.01, 0.05)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=4)
        gpu = sim(plugin).inject_xid(0, 79).gpu
        await kubelet.wait_for(lambda: endpoint.devices[gpu].health == "Unhealthy")  # the kubelet sees it anyway
        assert cluster.events == []
        cluster.heal()
        await cluster.wait_for(lambda: len(cluster.events_with("GPUUnhealthy")) == 1, timeout=10)
        assert plugin.stats.snapshot().cluster_updates[("condition", "error")] >= 1
