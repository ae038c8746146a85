"""`nvdp demo --node-config`: per-node configs through the node label, narrated.

The real pieces, wired as the chart wires them: the fake API server holds the node, the
config-manager runs its init step and then follows the node as the sidecar does, the plugin is a
child process found by its argv[0] and signalled with SIGHUP, and the fake kubelet shows what the
node advertises after every change.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import replace

from nvdp.app.config_manager import ConfigManager
from nvdp.config.manager import ManagerSettings
from nvdp.core.backoff import Backoff
from nvdp.core.resources import GPU_RESOURCE
from nvdp.kube.client import KubeClient
from nvdp.kube.connection import Direct
from nvdp.kube.rbac import CONFIG_MANAGER_RULES
from nvdp.testing import FakeKubelet
from nvdp.testing.configmap import write_configmap
from nvdp.testing.fake_apiserver import FakeApiServer
from nvdp.testing.process import PluginProcess
from nvdp.testing.waiting import eventually

Say = Callable[[str], None]
LABEL = "nvidia.com/device-plugin.config"
NODE = "demo-node"
CONFIGS = {
    "default": "version: v1\n",
    "sliced": "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 2\n",
    "by-index": "version: v1\nflags:\n  plugin:\n    deviceIDStrategy: index\n",
}


async def run_node_config_demo(say: Say, profile: str = "dgx-h100") -> None:
    with tempfile.TemporaryDirectory(prefix="nvdp-demo-node-config-") as folder:
        srcdir, dst = f"{folder}/available-configs", f"{folder}/config/config.yaml"
        write_configmap(srcdir, CONFIGS)
        os.mkdir(f"{folder}/config")
        name = f"nvdp-demo-plugin-{os.getpid()}"  # the demo's own name: never signal a real plugin
        settings = ManagerSettings(node_name=NODE, srcdir=srcdir, dst=dst, fallbacks=("named", "single"),
                                   process_to_signal=name)
        say(f"== nvdp demo --node-config: configs {', '.join(CONFIGS)} in a ConfigMap volume at {srcdir}")
        async with FakeApiServer() as api:
            api.require_token("demo", "system:serviceaccount:nvdp:nvdp", CONFIG_MANAGER_RULES)
            api.put_node(NODE, {})
            say(f"api: fake API server at {api.url}; node {NODE} has no {LABEL} label")
            async with KubeClient(Direct(api.url, "demo")) as client:
                await _story(say, api, client, settings, name, folder, profile)
        say("== demo done")


async def _story(say: Say, api: FakeApiServer, client: KubeClient, settings: ManagerSettings, name: str,
                 folder: str, profile: str) -> None:
    init = ConfigManager(replace(settings, oneshot=True, send_signal=False), client)
    await init.run()
    say(f"init container: linked {settings.dst} -> {os.readlink(settings.dst)} ({init.state.source})")

    manager = ConfigManager(settings, client, backoff=Backoff(0.1, 1.0))
    sidecar = asyncio.create_task(manager.follow())
    try:
        await api.wait_for(lambda: api.watch_count == 1)
        say("sidecar: following the node (list, then watch from the list's resourceVersion)")

        api.label_node(NODE, LABEL, "sliced")
        await eventually(lambda: len(manager.signalled) == 1, "the first change")
        say(f"label set to 'sliced' before the plugin runs: link -> {_target(settings)}; "
            f"signal: {manager.signalled[-1].value} (it reads the new config when it starts)")

        kubelet_folder = f"{folder}/kubelet"
        async with FakeKubelet(kubelet_folder) as kubelet:
            plugin = PluginProcess(kubelet_folder, args=("--simulate", profile), argv0=name,
                                   env={"CONFIG_FILE": settings.dst})
            async with plugin:
                endpoint = await kubelet.wait_registered(GPU_RESOURCE, timeout=60)
                say(f"plugin started (pid {plugin.pid}, argv[0] {name}): kubelet sees "
                    f"{len(endpoint.healthy)} x {GPU_RESOURCE}")
                await _switch(say, api, kubelet, manager, plugin, "by-index", "label changed to 'by-index'")
                await _unknown(say, api, manager, settings)
                await _api_away(say, api, kubelet, manager, plugin)
                await _switch(say, api, kubelet, manager, plugin, None, "label removed")
                _summary(say, kubelet, manager, plugin)
    finally:
        sidecar.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sidecar


async def _switch(say: Say, api: FakeApiServer, kubelet: FakeKubelet, manager: ConfigManager, plugin: PluginProcess,
                  value: str | None, what: str) -> None:
    signals, reloads = manager.state.signals, _reloads(plugin)
    api.label_node(NODE, LABEL, value)
    await eventually(lambda: manager.state.signals == signals + 1, f"the signal for: {what}")
    await eventually(lambda: _reloads(plugin) == reloads + 1, f"the plugin's reload for: {what}")
    advertised = len(kubelet.plugin(GPU_RESOURCE).healthy)
    say(f"{what}: link -> {manager.state.config or '(empty)'}, one SIGHUP, plugin reloaded; kubelet sees "
        f"{advertised} x {GPU_RESOURCE} on the same stream")


def _reloads(plugin: PluginProcess) -> int:
    return plugin.log().count(" reloaded ")


async def _unknown(say: Say, api: FakeApiServer, manager: ConfigManager, settings: ManagerSettings) -> None:
    api.label_node(NODE, LABEL, "no-such-config")
    await eventually(lambda: manager.state.unknown_label == "no-such-config", "the unknown label")
    event = api.events_about("Node", NODE)[-1]
    say(f"label set to 'no-such-config': config kept ({_target(settings)}), no signal, sidecar still running")
    say(f"    Event on the node: {event['type']} {event['reason']}: {event['message']}")
    from nvdp.ops.manager_metrics import render

    metrics = render(manager.state).decode().splitlines()
    line = next(x for x in metrics if x.startswith("nvdp_config_manager_label_unknown{"))
    say(f"    metric: {line}")


async def _api_away(say: Say, api: FakeApiServer, kubelet: FakeKubelet, manager: ConfigManager,
                    plugin: PluginProcess) -> None:
    await api.stop()
    await eventually(lambda: not manager.state.api_up, "the API server missed")
    say("API server gone: the config stays, the sidecar retries with back-off")
    signals, reloads = manager.state.signals, _reloads(plugin)
    api.label_node(NODE, LABEL, "sliced")  # changed while nobody can see it
    await api.start()
    await eventually(lambda: manager.state.signals == signals + 1, "the change applied after the API came back")
    await eventually(lambda: _reloads(plugin) == reloads + 1, "the plugin's reload")
    say(f"API server back; the label had changed to 'sliced' meanwhile: applied, one SIGHUP; kubelet sees "
        f"{len(kubelet.plugin(GPU_RESOURCE).healthy)} x {GPU_RESOURCE}")


def _summary(say: Say, kubelet: FakeKubelet, manager: ConfigManager, plugin: PluginProcess) -> None:
    updates = [u for u in kubelet.updates if u.resource == GPU_RESOURCE]
    registrations = sum(1 for e in kubelet.events if e.kind == "register" and e.resource == GPU_RESOURCE)
    low = min(u.allocatable for u in updates)
    say(f"kubelet, all along: {registrations} registration, {len(updates)} device-list messages on one stream, "
        f"lowest allocatable {low} (never 0); SIGHUPs sent: {manager.state.signals}; plugin reloads: "
        f"{_reloads(plugin)}")


def _target(settings: ManagerSettings) -> str:
    return os.path.basename(os.readlink(settings.dst))
