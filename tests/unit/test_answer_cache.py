"""Allocate answers are remembered per snapshot and serving context, bounded, and never reused
across a device update, a reload or a config whose answers differ per call."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from typing import Any

from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.core.devices import Resource
from nvdp.core.resources import GPU_RESOURCE, build_tree
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet.server import ANSWER_CACHE_SIZE, ResourceServer, ServingContext


class NoAbort:
    async def abort(self, code: object, details: str) -> None:
        raise AssertionError(details)


def serve(cfg: Config) -> tuple[ResourceServer, list[str], list[tuple[str, ...]]]:
    node = SimulatedBackend("dgx-h100").discover()
    resource = build_tree(node, cfg)[GPU_RESOURCE]
    seen: list[tuple[str, ...]] = []
    server = ResourceServer(resource, ServingContext(cfg, node.topology, node.control_devices), "/nonexistent",
                            on_allocate=lambda name, ids, error: seen.append(tuple(ids)))
    return server, [d.id for d in resource.devices], seen


def allocate(server: ResourceServer, *containers: list[str]) -> pb.AllocateResponse:
    request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=c) for c in containers])
    context: Any = NoAbort()
    return asyncio.run(server.Allocate(request, context))


def test_same_request_same_snapshot_is_answered_from_the_cache_and_still_counted() -> None:
    server, ids, seen = serve(Config())
    first = allocate(server, [ids[0], ids[1]])
    assert allocate(server, [ids[0], ids[1]]) is first
    assert allocate(server, [ids[1], ids[0]]) is not first  # order is part of the request
    assert seen == [(ids[0], ids[1]), (ids[0], ids[1]), (ids[1], ids[0])]


def test_a_device_update_drops_the_answers() -> None:
    server, ids, _ = serve(Config(pass_device_specs=True))
    before = allocate(server, [ids[0]])
    assert allocate(server, [ids[0]]) is before
    resource = server.resource
    moved = dataclasses.replace(resource.devices[0], paths=("/dev/nvidia7",))
    asyncio.run(server.update(Resource(resource.name, (moved, *resource.devices[1:]))))
    after = allocate(server, [ids[0]])
    assert "/dev/nvidia7" in [d.host_path for d in after.container_responses[0].devices]
    assert "/dev/nvidia7" not in [d.host_path for d in before.container_responses[0].devices]


def test_a_new_serving_context_drops_the_answers() -> None:
    server, ids, _ = serve(Config())
    assert allocate(server, [ids[3]]).container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == ids[3]
    server.context = dataclasses.replace(server.context, config=Config(device_id_strategy="index"))
    assert allocate(server, [ids[3]]).container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == "3"


def test_per_call_answers_are_not_remembered() -> None:
    server, ids, _ = serve(Config(device_list_strategy=("cdi-annotations",)))
    first, second = allocate(server, [ids[0]]), allocate(server, [ids[0]])
    assert first.container_responses[0].annotations != second.container_responses[0].annotations


def test_the_cache_is_bounded() -> None:
    server, ids, _ = serve(Config())
    requests = list(itertools.islice(itertools.permutations(ids, 3), ANSWER_CACHE_SIZE + 20))
    assert len(requests) == ANSWER_CACHE_SIZE + 20
    for pair in requests:
        allocate(server, list(pair))
    assert len(server._answers) == ANSWER_CACHE_SIZE
    first = allocate(server, list(requests[-1]))
    assert allocate(server, list(requests[-1])) is first


def test_several_containers_in_one_request() -> None:
    server, ids, seen = serve(Config())
    answer = allocate(server, [ids[0]], [ids[1]])
    assert [r.envs["NVIDIA_VISIBLE_DEVICES"] for r in answer.container_responses] == [ids[0], ids[1]]
    assert allocate(server, [ids[0]], [ids[1]]) is answer
    assert seen == [(ids[0],), (ids[1],)] * 2


def test_new_cdi_classes_drop_the_answers() -> None:
    # cdi-cri names the feature classes nvdp wrote specs for: a CDI refresh changes the answer.
    server, ids, _ = serve(Config(device_list_strategy=("cdi-cri",), gdrcopy_enabled=True))
    before = allocate(server, [ids[0]]).container_responses[0]
    assert "k8s.device-plugin.nvidia.com/gdrcopy=all" in [d.name for d in before.cdi_devices]
    server.context = dataclasses.replace(server.context, cdi_classes=frozenset({"gpu"}))
    after = allocate(server, [ids[0]]).container_responses[0]
    assert [d.name for d in after.cdi_devices] == [f"k8s.device-plugin.nvidia.com/gpu={ids[0]}"]


def _mps(root: str) -> Config:
    text = "version: v1\nsharing:\n  mps:\n    resources:\n    - {name: nvidia.com/gpu, replicas: 2}\n"
    return load({"config_file": "/c.yaml", "mps_root": root}, {}, lambda _: text)


def test_a_new_mps_root_drops_the_answers() -> None:
    server, ids, _ = serve(_mps("/run/nvidia/mps"))
    first = allocate(server, [ids[0]])
    assert allocate(server, [ids[0]]) is first  # MPS answers are cached too
    assert first.container_responses[0].envs["CUDA_MPS_PIPE_DIRECTORY"] == "/mps/nvidia.com/gpu/pipe"
    assert "/run/nvidia/mps/shm" in [m.host_path for m in first.container_responses[0].mounts]
    server.context = dataclasses.replace(server.context, config=_mps("/var/lib/mps"))
    mounts = [m.host_path for m in allocate(server, [ids[0]]).container_responses[0].mounts]
    assert "/var/lib/mps/shm" in mounts and "/run/nvidia/mps/shm" not in mounts
