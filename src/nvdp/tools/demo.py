"""`nvdp demo`: the real plugin on a simulated node, against the fake kubelet, narrated."""

from __future__ import annotations

import asyncio
import itertools
import math
import tempfile
import time
from collections.abc import Callable, Sequence

from nvdp.app.plugin import Plugin
from nvdp.config.load import load
from nvdp.core.cdi import uses_cdi
from nvdp.core.devices import Node
from nvdp.core.labels import label_lines, node_labels
from nvdp.core.resources import GPU_RESOURCE
from nvdp.core.scoring import pair_score, set_score
from nvdp.testing import FakeKubelet
from nvdp.tools.demo_cdi import cdi_story
from nvdp.tools.demo_health import DEMO_SETTINGS, health_story
from nvdp.tools.report import table

Say = Callable[[str], None]


async def run_demo(profile: str, say: Say, device_list_strategy: str | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="nvdp-demo-") as folder:
        kubelet_socket = f"{folder}/kubelet.sock"
        # CDI specs go to the demo's own folder, not the node's /var/run/cdi.
        extra = {"device_list_strategy": device_list_strategy, "cdi_spec_dir": f"{folder}/cdi"}
        cfg = load({"simulate": profile, "kubelet_socket": kubelet_socket, **DEMO_SETTINGS, **extra}, {})
        say(f"== nvdp demo: simulated node '{profile}', fake kubelet in {folder}")
        async with FakeKubelet(folder) as kubelet:
            plugin = Plugin(cfg)
            task = asyncio.create_task(plugin.run())
            try:
                await _narrate(plugin, kubelet, say)
            finally:
                plugin.stop()
                await task
        say("== plugin stopped, sockets removed; demo done")


async def _narrate(plugin: Plugin, kubelet: FakeKubelet, say: Say) -> None:
    started = time.monotonic()
    endpoint = await kubelet.wait_registered(GPU_RESOURCE)
    say(f"kubelet: {GPU_RESOURCE} registered at {endpoint.endpoint} "
        f"after {(time.monotonic() - started) * 1000:.0f} ms; options: "
        f"preferred allocation={endpoint.options.get_preferred_allocation_available}")
    assert plugin.node is not None
    names = {g.uuid: g.name for g in plugin.node.gpus}
    rows = [["DEVICE ID", "HEALTH", "NUMA", "GPU"]]
    for device_id, d in endpoint.devices.items():
        numa = ",".join(str(n.ID) for n in d.topology.nodes) or "-"
        rows.append([device_id, d.health, numa, names.get(device_id, "")])
    say(f"kubelet: ListAndWatch holds {len(endpoint.devices)} devices:")
    say(_indent(table(rows)))
    # The same discovered node, as `gpu-feature-discovery` labels it (no machine-type file here).
    labelled = node_labels(plugin.node, plugin.cfg, machine_type=None, timestamp=None)
    say(f"gpu-feature-discovery: {len(labelled.labels)} node labels for NFD (docs/labels.md):")
    say(_indent(label_lines(labelled.labels)))

    available = endpoint.healthy
    size = min(2, len(available))
    chosen = await kubelet.preferred_allocation(GPU_RESOURCE, available, [], size)
    say(f"kubelet: GetPreferredAllocation(size={size}) -> {', '.join(chosen)}")
    say("    " + describe_choice(plugin.node, chosen))
    if len(available) >= 4:
        four = await kubelet.preferred_allocation(GPU_RESOURCE, available, [], 4)
        say(f"kubelet: GetPreferredAllocation(size=4) -> {', '.join(four)}")
        say("    " + describe_choice(plugin.node, four))
    say("    (score: 100 per NVLink + PCIe 60 same board .. 10 across CPUs, summed over pairs; "
        "docs/allocation.md)")
    response = await kubelet.allocate(GPU_RESOURCE, chosen)
    say("kubelet: Allocate -> envs " + ", ".join(f"{k}={v}" for k, v in sorted(response.envs.items())))
    if uses_cdi(plugin.cfg):
        cdi_story(plugin.cfg.cdi_spec_dir, [d.name for d in response.cdi_devices], dict(response.annotations), say)

    say("kubelet: restarting (deletes every socket in the folder, serves a new kubelet.sock)")
    restart = time.monotonic()
    before = kubelet.events[-1].at if kubelet.events else restart
    await kubelet.restart()
    await kubelet.wait_registered(GPU_RESOURCE)
    registered = next(e.at for e in kubelet.events if e.kind == "register" and e.at > before)
    say(f"kubelet: {GPU_RESOURCE} registered again {(registered - restart) * 1000:.1f} ms after the restart "
        f"with {len(kubelet.plugin(GPU_RESOURCE).devices)} devices")

    await health_story(plugin, kubelet, say)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def describe_choice(node: Node, chosen: Sequence[str]) -> str:
    """'GPUs 2,3: score 250 (pairs 2-3 250); best 2-GPU set here: 250' for the demo."""
    index = {g.uuid: g.index for g in node.gpus}
    members = sorted(chosen, key=lambda u: index.get(u, -1))
    pairs = " ".join(
        f"{index[a]}-{index[b]} {pair_score(node.topology, a, b)}" for a, b in itertools.combinations(members, 2)
    )
    text = f"GPUs {','.join(str(index[u]) for u in members)}: score {set_score(node.topology, members)}"
    text += f" (pairs {pairs})" if pairs else ""
    k, uuids = len(members), [g.uuid for g in node.gpus]
    if math.comb(len(uuids), k) <= 20_000:  # the optimum by enumeration, for the reader to compare
        best = max(set_score(node.topology, c) for c in itertools.combinations(uuids, k))
        text += f"; best {k}-GPU set on this node: {best}"
    return text
