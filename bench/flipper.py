"""A plugin child process whose device health is flipped on command, for the fan-out benchmark.

    python -m bench.flipper <kubelet socket>

Runs the real `Plugin` on the simulated dgx-h100 node. Each line "flip" on stdin toggles the
health of the first GPU through `Manager.apply` (the path every health change takes) and answers
"flipped" on stdout. "ready" is printed once serving. The change is applied directly, so the
figure is the fan-out alone; bench/health.py measures the path from an injected XID.
"""

from __future__ import annotations

import asyncio
import sys

from nvdp.app.plugin import Plugin
from nvdp.config.load import load
from nvdp.core.devices import DeviceTree, Health, Resource
from nvdp.core.resources import GPU_RESOURCE


def flipped(tree: DeviceTree) -> DeviceTree:
    resource = tree[GPU_RESOURCE]
    first, *rest = resource.devices
    health = Health.UNHEALTHY if first.healthy else Health.HEALTHY
    changed = first.with_health(health, "flipped by the benchmark")
    return {**tree, GPU_RESOURCE: Resource(resource.name, (changed, *rest))}


async def main(kubelet_socket: str) -> None:
    plugin = Plugin(load({"simulate": "dgx-h100", "kubelet_socket": kubelet_socket}, {}))
    running = asyncio.create_task(plugin.run(handle_signals=True))
    await plugin.started.wait()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    while line := await reader.readline():
        if line.strip() == b"flip":
            await plugin.manager.apply(flipped(plugin.manager.tree))
            print("flipped", flush=True)
    plugin.stop()
    await running


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
