"""Per-node config switches end to end: the fake API server's node label, the config-manager (init
step, then sidecar), the real plugin as a child process found by its argv[0], the fake kubelet.

What the kubelet sees is the proof: through every switch the resource keeps its one registration
and its one ListAndWatch stream, and every message it gets advertises devices, so the node's
allocatable never drops to 0 (the official plugin restarts every gRPC server on SIGHUP, and the
kubelet marks the devices unhealthy until they register again).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nvdp.app.config_manager import ConfigManager
from nvdp.config.manager import ManagerSettings
from nvdp.core.backoff import Backoff
from nvdp.core.resources import GPU_RESOURCE
from nvdp.kube.client import KubeClient
from nvdp.kube.connection import Direct
from nvdp.kube.rbac import CONFIG_MANAGER_RULES
from nvdp.testing import FakeKubelet, eventually, stays_true
from nvdp.testing.configmap import write_configmap
from nvdp.testing.fake_apiserver import FakeApiServer
from nvdp.testing.process import PluginProcess

LABEL = "nvidia.com/device-plugin.config"
NODE = "gpu-node-1"
GPUS = 8  # the dgx-h100 profile
CONFIGS = {
    "default": "version: v1\n",
    "sliced": "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 2\n",
    "by-index": "version: v1\nflags:\n  plugin:\n    deviceIDStrategy: index\n",
}
TOKEN = "sa-token"


@dataclass
class Node:
    api: FakeApiServer
    kubelet: FakeKubelet
    plugin: PluginProcess
    manager: ConfigManager
    dst: Path

    def reloads(self) -> int:
        return self.plugin.log().count(" reloaded ")

    def target(self) -> str:
        return os.path.basename(os.readlink(self.dst))

    async def devices(self, count: int, what: str) -> None:
        def advertised() -> bool:
            p = self.kubelet.plugins.get(GPU_RESOURCE)
            return p is not None and p.connected and len(p.healthy) == count

        await eventually(advertised, f"{what} ({count} {GPU_RESOURCE})")

    def never_dropped(self) -> None:
        """One registration, one stream, and every message with devices in it."""
        registrations = [e for e in self.kubelet.events if e.kind == "register" and e.resource == GPU_RESOURCE]
        updates = [u for u in self.kubelet.updates if u.resource == GPU_RESOURCE]
        assert len(registrations) == 1, registrations
        assert updates and min(u.allocatable for u in updates) > 0, updates
        assert self.kubelet.errors == [] and self.api.errors == []


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    srcdir, dst = tmp_path / "available-configs", tmp_path / "config" / "config.yaml"
    write_configmap(str(srcdir), CONFIGS)
    dst.parent.mkdir()
    name = f"nvdp-test-plugin-{uuid.uuid4().hex[:8]}"  # unique: never signal another test's plugin
    settings = ManagerSettings(node_name=NODE, srcdir=str(srcdir), dst=str(dst), fallbacks=("named", "single"),
                               process_to_signal=name)
    async with FakeApiServer() as api:
        api.require_token(TOKEN, "system:serviceaccount:nvdp:nvdp", CONFIG_MANAGER_RULES)
        api.put_node(NODE, {})
        async with KubeClient(Direct(api.url, TOKEN)) as client:
            # The init container: the link exists before the plugin starts.
            init = ConfigManager(ManagerSettings(**{**settings.__dict__, "oneshot": True, "send_signal": False}),
                                 client)
            await init.run()
            folder = str(tmp_path / "kubelet")
            async with FakeKubelet(folder) as kubelet:
                plugin = PluginProcess(folder, args=("--simulate", "dgx-h100"), argv0=name,
                                       env={"CONFIG_FILE": str(dst)})
                async with plugin:
                    await kubelet.wait_registered(GPU_RESOURCE, timeout=60, min_devices=GPUS)
                    manager = ConfigManager(settings, client, backoff=Backoff(0.02, 0.2))
                    sidecar = asyncio.create_task(manager.follow())
                    try:
                        yield Node(api, kubelet, plugin, manager, dst)
                    finally:
                        sidecar.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await sidecar


async def test_label_set_changed_unknown_removed_never_drops_allocatable(node: Node) -> None:
    await node.api.wait_for(lambda: node.api.watch_count == 1)
    await stays_true(lambda: node.reloads() == 0, 0.3, "no SIGHUP when the sidecar starts after the init step")
    assert node.target() == "default"

    node.api.label_node(NODE, LABEL, "sliced")  # set: 2 replicas per GPU on the same resource
    await node.devices(2 * GPUS, "the time-sliced devices")
    assert node.reloads() == 1

    node.api.label_node(NODE, LABEL, "by-index")  # changed
    await node.devices(GPUS, "the plain devices again")
    await eventually(lambda: node.reloads() == 2, "the second reload")

    node.api.label_node(NODE, LABEL, "missing")  # unknown: nothing changes, the sidecar stays
    await eventually(lambda: node.manager.state.unknown_label == "missing", "the unknown label seen")
    await stays_true(lambda: node.reloads() == 2 and node.target() == "by-index", 0.5, "the config kept")
    [event] = node.api.events_about("Node", NODE)
    assert event["reason"] == "UnknownConfig"

    node.api.label_node(NODE, LABEL, None)  # removed: the default, with the same devices as by-index
    await eventually(lambda: node.reloads() == 3, "the reload for the removed label")
    assert node.target() == "default"
    await node.devices(GPUS, "the default config's devices")

    node.never_dropped()
    assert node.plugin.process is not None and node.plugin.process.returncode is None


async def test_allocate_works_on_the_same_stream_after_a_switch(node: Node) -> None:
    node.api.label_node(NODE, LABEL, "sliced")
    await node.devices(2 * GPUS, "the time-sliced devices")
    endpoint = node.kubelet.plugin(GPU_RESOURCE)
    replica = next(i for i in endpoint.devices if "::" in i)
    answer = await node.kubelet.allocate(GPU_RESOURCE, [replica])
    assert answer.envs["NVIDIA_VISIBLE_DEVICES"] == replica.split("::")[0]
    node.never_dropped()


async def test_the_check_sees_a_plugin_that_restarts(node: Node) -> None:
    """What the official plugin's SIGHUP does (its servers stop, then register again) is caught."""
    await node.plugin.kill()
    await eventually(lambda: not node.kubelet.plugin(GPU_RESOURCE).connected, "the stream ended")
    with pytest.raises(AssertionError):
        node.never_dropped()
    assert [u.allocatable for u in node.kubelet.updates if u.resource == GPU_RESOURCE][-1] == 0
