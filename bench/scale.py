"""Scale: the largest device list the plugin can serve, against the kubelet's 4 MiB gRPC limit.

The kubelet reads ListAndWatch with gRPC's default 4 MiB receive limit, and the whole list goes
in one message. With time-slicing, each replica is one device, so the limit caps the replicas.
The size is that of the real message the plugin sends (built by server.py, serialized by
protobuf); the largest list is then served for real to the fake kubelet, whose channel has the
same 4 MiB limit, and one more replica per GPU is shown to be rejected.
"""

from __future__ import annotations

import os
import time
from functools import cache
from pathlib import Path

from bench.harness import Figure, Settings
from bench.rig import DGX_GPUS, SIMULATED, START_TIMEOUT_S, kubelet_folder, running_plugin, timed_calls, wait_event
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.options import Config, Sharing, TimeSlicingResource
from nvdp.core.devices import Node, Resource
from nvdp.core.resources import GPU_RESOURCE, build_tree
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet.server import KUBELET_MAX_MESSAGE_BYTES, device_message
from nvdp.testing.process import PluginProcess

KUBELET_MAX_MESSAGE = KUBELET_MAX_MESSAGE_BYTES  # gRPC's default max receive size, which the kubelet keeps


@cache
def _node() -> Node:
    return SimulatedBackend("dgx-h100").discover()


def _resource(replicas: int) -> Resource:
    shared = (TimeSlicingResource(GPU_RESOURCE, replicas),) if replicas > 1 else ()
    cfg = Config(simulate="dgx-h100", sharing=Sharing(resources=shared))
    return build_tree(_node(), cfg)[GPU_RESOURCE]


def message_size(replicas: int) -> int:
    """Serialized size of the plugin's ListAndWatch message on dgx-h100 with `replicas` per GPU."""
    devices = _resource(replicas).devices
    return pb.ListAndWatchResponse(devices=[device_message(d) for d in devices]).ByteSize()


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def largest_replicas(limit: int = KUBELET_MAX_MESSAGE, ceiling: int = 10_000) -> int:
    """The most replicas per GPU whose message still fits.

    A repeated field costs, per element, one tag byte, the length as a varint and the element, so
    the size for R replicas is a sum over the devices of replicas 0..R-1: one tree built with
    `ceiling` replicas gives every R at once. The answer is then checked on real messages."""
    per_replica = [0] * ceiling
    for device in _resource(ceiling).devices:
        size = device_message(device).ByteSize()
        per_replica[device.replica or 0] += 1 + _varint_len(size) + size
    total, replicas = 0, 0
    while replicas < ceiling and total + per_replica[replicas] <= limit:
        total += per_replica[replicas]
        replicas += 1
    if replicas == ceiling:
        raise ValueError(f"more than {ceiling} replicas per GPU fit in {limit} bytes; raise the ceiling")
    if not message_size(replicas) <= limit < message_size(replicas + 1):
        raise AssertionError(f"size model wrong around {replicas} replicas")
    return replicas


def config_file(folder: str, replicas: int) -> str:
    path = Path(folder) / f"replicas-{replicas}.yaml"
    path.write_text(
        "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
        f"    - name: {GPU_RESOURCE}\n      replicas: {replicas}\n"
    )
    return str(path)


async def serve_largest(settings: Settings, replicas: int) -> list[Figure]:
    devices = DGX_GPUS * replicas
    startup, allocate = [], []
    preferred: dict[int, list[float]] = {}
    for _ in range(settings.n(3, 1)):
        async with kubelet_folder() as (folder, kubelet):
            args = (*SIMULATED, f"--config-file={config_file(folder, replicas)}")
            async with PluginProcess(folder, args) as plugin:
                listed = await wait_event(kubelet, "devices", plugin.spawned_at, GPU_RESOURCE)
                startup.append((listed.at - plugin.spawned_at) * 1000)
                assert len(kubelet.plugin(GPU_RESOURCE).devices) == devices
    async with running_plugin(
        (*SIMULATED, f"--config-file={config_file(os.environ.get('TMPDIR', '/tmp'), replicas)}"),
        min_devices=devices,
    ) as rig:
        ids = sorted(rig.kubelet.plugin(GPU_RESOURCE).devices)

        async def alloc(i: int) -> object:
            return await rig.kubelet.allocate(GPU_RESOURCE, [ids[(i * 7919) % len(ids)]])

        for size in (1, 8, 100):
            async def prefer(i: int, size: int = size) -> object:
                return await rig.kubelet.preferred_allocation(GPU_RESOURCE, ids, [], size)

            preferred[size] = await timed_calls(prefer, settings.n(20, 5), 1)
        allocate = await timed_calls(alloc, settings.n(200, 50), 1)
    return [
        Figure(f"exec -> kubelet holds {devices:,} devices", "ms", startup),
        *(Figure(f"GetPreferredAllocation ({size} of {devices:,} available)", "ms", samples,
                 note="the request itself carries every available ID")
          for size, samples in preferred.items()),
        Figure(f"Allocate (1 replica of {devices:,})", "ms", allocate),
    ]


async def over_limit(replicas: int) -> str:
    """Serve one replica per GPU more than fits; return how the fake kubelet's stream ended."""
    async with kubelet_folder() as (folder, kubelet):
        args = (*SIMULATED, f"--config-file={config_file(folder, replicas)}")
        async with PluginProcess(folder, args) as plugin:
            ended = await wait_event(kubelet, "disconnected", plugin.spawned_at, GPU_RESOURCE, START_TIMEOUT_S)
            received = len(kubelet.plugin(GPU_RESOURCE).devices)
    return f"{ended.detail} (devices received: {received})"


async def run(settings: Settings) -> list[Figure]:
    t0 = time.perf_counter()
    replicas = largest_replicas()
    search_s = time.perf_counter() - t0
    size, next_size = message_size(replicas), message_size(replicas + 1)
    rejected = await over_limit(replicas + 1)
    return [
        Figure("ListAndWatch message, 8 GPUs, no sharing", "bytes", [float(message_size(1))]),
        Figure("largest device list that fits 4 MiB (dgx-h100, time-slicing)", "devices",
               [float(DGX_GPUS * replicas)],
               extra={"replicas_per_gpu": replicas, "message_bytes": size, "limit_bytes": KUBELET_MAX_MESSAGE,
                      "next_replicas_message_bytes": next_size, "search_s": round(search_s, 2),
                      "kubelet_with_one_more_replica_per_gpu": rejected}),
        Figure("ListAndWatch message at the largest list", "bytes", [float(size)],
               note=f"{size / KUBELET_MAX_MESSAGE:.4%} of 4 MiB; one more replica per GPU: {rejected}"),
        *await serve_largest(settings, replicas),
    ]
