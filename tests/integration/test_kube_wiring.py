"""The two API users wired to the real client (kube.KubeClient), against the fake kube-apiserver
with a token allowed only the rules of kube/rbac.py: --cluster-health (Events, the GPUHealthy
condition on nodes/status, the taint) and GFD's NodeFeature output (`nvdp labels
--use-node-feature-api=true`, run as the program)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from click.testing import CliRunner

from nvdp.app.cluster_api import open_cluster_api
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.cli import main
from nvdp.config.options import Config
from nvdp.core import nodefeature
from nvdp.kube.connection import Direct
from nvdp.kube.rbac import CLUSTER_HEALTH_RULES, GFD_RULES
from nvdp.ops.cluster import TAINT_KEY
from nvdp.testing import FakeKubelet, eventually
from nvdp.testing.fake_apiserver import NODE_FEATURES, NODES, PODS, FakeApiServer
from nvdp.testing.fake_objects import daemonset_pod
from tests.conftest import running_plugin

GPU = "nvidia.com/gpu"
NODE = "gpu-node-7"
TOKEN = "plugin-token"
MakeConfig = Callable[..., Config]
STEADY = {"health_quiet_period": "0.5", "health_probe_interval": "0.05"}
BIN = Path(sys.executable).parent


def gpu_condition(api: FakeApiServer) -> dict[str, str]:
    conditions = api.node(NODE).get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == "GPUHealthy"), {})


def taints(api: FakeApiServer) -> list[dict[str, str]]:
    return list(api.node(NODE).get("spec", {}).get("taints") or [])


def kubeconfig(folder: Path, api: FakeApiServer, token: str) -> Path:
    path = folder / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "sa"}}],
    }))
    return path


async def test_cluster_health_on_the_api_server(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with FakeApiServer() as api:
        api.put_node(NODE)
        api.node(NODE)  # exists
        api.require_token(TOKEN, "system:serviceaccount:nvdp:nvdp", CLUSTER_HEALTH_RULES)
        # the kubelet's own condition and a taint someone else set: both must stay
        api._patch(NODES, "", NODE, {"status": {"conditions": [{"type": "Ready", "status": "True"}]}},
                   "application/strategic-merge-patch+json", subresource="status")
        api._patch(NODES, "", NODE, {"spec": {"taints": [{"key": "other", "effect": "NoExecute"}]}},
                   "application/merge-patch+json")
        cfg = make_config("dgx-h100", cluster_health="true", taint_on_fatal="true", node_name=NODE, **STEADY)
        cluster_api = open_cluster_api(Direct(api.url, TOKEN))
        async with running_plugin(cfg, cluster_api=cluster_api) as plugin:
            await kubelet.wait_registered(GPU, min_devices=8)
            await api.wait_for(lambda: gpu_condition(api).get("status") == "True")
            assert gpu_condition(api)["message"] == "all 8 GPUs healthy"
            assert isinstance(plugin.backend, SimulatedBackend)
            fatal = plugin.backend.inject_xid(3, 79).gpu
            await api.wait_for(lambda: gpu_condition(api).get("status") == "False" and len(taints(api)) == 2)
            (event,) = api.events_about("Node", NODE)
            assert event["reason"] == "GPUUnhealthy" and event["type"] == "Warning"
            assert event["involvedObject"]["uid"] == api.node(NODE)["metadata"]["uid"]
            assert event["metadata"]["namespace"] == "default"
            assert event["metadata"]["annotations"]["nvidia.com/gpu-uuid"] == fatal
            assert event["metadata"]["annotations"]["nvidia.com/xid"] == "79"
            assert gpu_condition(api)["message"].startswith("1 of 8 GPUs unhealthy: GPU 3 ")
            assert {"key": TAINT_KEY, "value": "1", "effect": "NoSchedule"} in taints(api)
            conditions = [c["type"] for c in api.node(NODE)["status"]["conditions"]]
            assert conditions == ["Ready", "GPUHealthy"]  # a strategic merge: the kubelet's stays
            probes = plugin.health.probes_run
            plugin.backend.lose(3)
            await eventually(lambda: plugin.health.probes_run >= probes + 2, "a probe that finds GPU 3 lost")
            plugin.backend.restore(3)  # a reset: the fatal XID clears
            await api.wait_for(lambda: gpu_condition(api).get("status") == "True" and len(taints(api)) == 1,
                               timeout=10)
            assert taints(api) == [{"key": "other", "effect": "NoExecute"}]
        assert {c.code for c in api.requests} <= {200, 201}, [c for c in api.requests if c.code >= 300]
        # (the audit names nodes/status "nodes"; a patch of the node itself would have kept the old status)
        assert {(c.verb, c.resource) for c in api.requests} == {("get", "nodes"), ("patch", "nodes"),
                                                                ("create", "events")}
        assert api.errors == []


def test_cluster_health_without_api_settings_stops_the_start(tmp_path: Path) -> None:
    args = ["serve", "--simulate", "h200", "--kubelet-socket", "", "--cluster-health", "--node-name", NODE]
    env = {"KUBECONFIG": "", "KUBERNETES_SERVICE_HOST": "", "KUBERNETES_SERVICE_PORT": ""}
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 2, result.output
    assert "KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT" in result.output
    result = CliRunner().invoke(main, [*args, "--kubeconfig", str(tmp_path / "absent")], env=env)
    assert result.exit_code == 2 and "is not a file" in result.output


async def labels_run(config: Path, *extra: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NVDP_", "GFD_", "USE_NODE", "NODE_NAME", "NAMESPACE", "POD_NAME", "KUBE"))}
    process = await asyncio.create_subprocess_exec(
        str(BIN / "nvdp"), "labels", "--oneshot", "--no-timestamp", "--use-node-feature-api=true",
        "--simulate", "h200", "--node-name", "node-1", "--namespace", "gpu-operator", "--pod-name", "gfd-x1",
        "--kubeconfig", str(config), *extra,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    return await process.wait(), output.decode()


async def test_labels_as_a_node_feature_object(tmp_path: Path) -> None:
    async with FakeApiServer() as api:
        api.add_type(NODE_FEATURES)
        api.add_type(PODS)
        api.create(PODS, daemonset_pod("gfd-x1", "nvdp-gpu-feature-discovery"), "gpu-operator")
        api.require_token(TOKEN, "system:serviceaccount:gpu-operator:gfd", GFD_RULES)
        config = kubeconfig(tmp_path, api, TOKEN)
        code, output = await labels_run(config)
        assert code == 0, output
        stored = api.get(NODE_FEATURES, "nvidia-features-for-node-1", "gpu-operator")
        assert stored is not None, output
        labels = stored["spec"]["labels"]
        assert labels["nvidia.com/gpu.product"].startswith("NVIDIA-H200") and labels["nvidia.com/gpu.count"] == "1"
        assert "nvidia.com/gfd.timestamp" not in labels
        assert stored["metadata"]["labels"] == {nodefeature.NODE_NAME_LABEL: "node-1"}
        owners = {(o["kind"], o["name"]) for o in stored["metadata"]["ownerReferences"]}
        assert owners == {("DaemonSet", "nvdp-gpu-feature-discovery"), ("Pod", "gfd-x1")}
        version = stored["metadata"]["resourceVersion"]
        first = len(api.requests)

        code, output = await labels_run(config)  # the same labels: read, and nothing sent
        assert code == 0, output
        assert [(c.verb, c.resource) for c in api.requests[first:]] == [("get", "pods"), ("get", "nodefeatures")]
        assert api.get(NODE_FEATURES, "nvidia-features-for-node-1", "gpu-operator")["metadata"][  # type: ignore[index]
            "resourceVersion"] == version

        code, output = await labels_run(config, "--mig-strategy", "single")  # a change: one update
        assert code == 0, output
        assert ("update", "nodefeatures") in [(c.verb, c.resource) for c in api.requests]
        failed = [(c.verb, c.resource, c.code) for c in api.requests if c.code >= 300]
        assert failed == [("get", "nodefeatures", 404)]  # the first run's look before creating
        assert api.errors == []


async def test_labels_without_api_permissions_fail_clearly(tmp_path: Path) -> None:
    async with FakeApiServer() as api:
        api.add_type(NODE_FEATURES)
        api.require_token(TOKEN, "nobody", ())
        code, output = await labels_run(kubeconfig(tmp_path, api, TOKEN))
        assert code != 0
        assert "403" in output and "Traceback" not in output
