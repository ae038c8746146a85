"""Malformed gRPC requests through a raw client: a clear gRPC error or a correct answer, never a
crash, and the plugin keeps serving.

The plugin runs in a background thread with its own event loop, so hypothesis (synchronous) can
throw hundreds of generated requests at one running server through a blocking stub.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvdp.app.plugin import Plugin
from nvdp.config.load import load
from nvdp.core.resources import physical_id
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet._proto import api_pb2_grpc as pb_grpc
from nvdp.testing import WAIT_S, FakeKubelet
from tests.reliability.conftest import LogWatch

GPU = "nvidia.com/gpu"
INT32_MAX = 2**31 - 1
SHARED_REPLICAS = 1250  # 8 GPUs x 1250 = 10,000 valid device IDs


@dataclass
class Served:
    stub: pb_grpc.DevicePluginStub
    ids: list[str]
    channel: grpc.Channel


@dataclass
class BackgroundPlugin:
    """The real plugin and a fake kubelet on an event loop in a thread of their own."""

    config_text: str | None = None

    def __enter__(self) -> Served:
        self.folder = tempfile.mkdtemp(prefix="nvdp-")
        cli: dict[str, Any] = {"simulate": "dgx-h100", "kubelet_socket": f"{self.folder}/kubelet.sock"}
        if self.config_text:
            with open(f"{self.folder}/config.yaml", "w") as f:
                f.write(self.config_text)
            cli["config_file"] = f"{self.folder}/config.yaml"
        self.plugin = Plugin(load(cli, {}))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        ids = self._call(self._start())
        self.channel = grpc.insecure_channel(f"unix://{self.folder}/nvidia-gpu.sock")
        return Served(pb_grpc.DevicePluginStub(self.channel), ids, self.channel)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    async def _start(self) -> list[str]:
        self.kubelet = FakeKubelet(self.folder)
        await self.kubelet.start()
        self.task = asyncio.create_task(self.plugin.run())
        endpoint = await self.kubelet.wait_registered(GPU, timeout=WAIT_S)
        return sorted(endpoint.devices)

    async def _stop(self) -> None:
        self.plugin.stop()
        await self.task
        await self.kubelet.stop()

    def __exit__(self, *exc: object) -> None:
        self.channel.close()
        self._call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)
        self.loop.close()
        shutil.rmtree(self.folder, ignore_errors=True)


SHARED_CONFIG = (
    "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
    f"    - name: {GPU}\n      replicas: {SHARED_REPLICAS}\n"
)


@pytest.fixture(scope="module")
def whole() -> Iterator[Served]:
    with BackgroundPlugin() as served:
        yield served


@pytest.fixture(scope="module")
def shared() -> Iterator[Served]:
    with BackgroundPlugin(SHARED_CONFIG) as served:
        yield served


def allocate(*containers: list[str]) -> pb.AllocateRequest:
    return pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=c) for c in containers])


def prefer(available: list[str], must: list[str], size: int) -> pb.PreferredAllocationRequest:
    return pb.PreferredAllocationRequest(container_requests=[
        pb.ContainerPreferredAllocationRequest(
            available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size)
    ])


def check_preferred(response: pb.PreferredAllocationResponse, available: list[str], must: list[str],
                    size: int, known: list[str]) -> None:
    """The fake kubelet's rules for one container's answer, with the allocator's documented
    leniency for requests the kubelet never sends (docs/allocation.md): a must-include ID is
    answered even when it is missing from the available list, and an unknown one is ignored."""
    (container,) = response.container_responses
    ids = list(container.deviceIDs)
    assert len(set(ids)) == len(ids), "duplicate IDs"
    assert set(ids) <= set(available) | set(must), "IDs neither available nor must-include"
    assert not ids or {m for m in must if m in known} <= set(ids), "must-include IDs dropped"
    assert len(ids) <= max(size, 0), "more IDs than asked for"


Case = Callable[[list[str]], Any]


@pytest.mark.parametrize(
    ("method", "request_for", "expect"),
    [
        pytest.param("Allocate", lambda ids: allocate(), "0 containers", id="no container requests"),
        pytest.param("Allocate", lambda ids: allocate([]), 'NVIDIA_VISIBLE_DEVICES=""', id="empty ID list"),
        pytest.param("Allocate", lambda ids: allocate([ids[0], ids[0], ids[0]]), "NVIDIA_VISIBLE_DEVICES=id0",
                     id="duplicate IDs"),
        pytest.param("Allocate", lambda ids: allocate([ids[0]], [ids[1]], [ids[0]]), "3 containers",
                     id="several containers, same device twice"),
        pytest.param("Allocate", lambda ids: allocate([""]), "INVALID_ARGUMENT unknown device", id="empty ID"),
        pytest.param("Allocate", lambda ids: allocate([f"GPU-{i}" for i in range(10_000)]),
                     "INVALID_ARGUMENT unknown device: GPU-0", id="10,000 unknown IDs"),
        pytest.param("Allocate", lambda ids: allocate([*ids, "GPU-x"]), "INVALID_ARGUMENT unknown device: GPU-x",
                     id="known IDs then an unknown one"),
        pytest.param("Allocate", lambda ids: allocate(["x" * 1_000_000]), "INVALID_ARGUMENT 1000000 characters",
                     id="a 1 MB ID"),
        pytest.param("Allocate", lambda ids: allocate(["GPU-\x00\n\u202e"]), "INVALID_ARGUMENT 'GPU-\\x00\\n\\u202e'",
                     id="control characters in an ID"),
        pytest.param("Allocate", lambda ids: allocate(*[[i] for i in ids] * 125), "1000 containers",
                     id="1,000 containers"),
        pytest.param("GetPreferredAllocation", lambda ids: prefer(ids, [], INT32_MAX), "[]", id="size 2^31-1"),
        pytest.param("GetPreferredAllocation", lambda ids: prefer(ids, [], -1), "[]", id="negative size"),
        pytest.param("GetPreferredAllocation", lambda ids: prefer(ids, [], 0), "[]", id="size 0"),
        pytest.param("GetPreferredAllocation", lambda ids: prefer([], [], 2), "[]", id="nothing available"),
        pytest.param("GetPreferredAllocation", lambda ids: prefer(ids[:2], [ids[5]], 2), "2 IDs",
                     id="must-include not available"),
        pytest.param("GetPreferredAllocation", lambda ids: prefer([*ids, "GPU-x"], ["GPU-x"], 2), "2 IDs",
                     id="must-include unknown (but listed as available)"),
        pytest.param("GetPreferredAllocation", lambda ids: prefer(ids[:4], ids[:3], 2), "[]",
                     id="must-include larger than size"),
        pytest.param("GetPreferredAllocation", lambda ids: prefer(ids + ids, [ids[1], ids[1]], 3), "3 IDs",
                     id="duplicates in available and must-include"),
        pytest.param("GetPreferredAllocation", lambda ids: prefer([f"x{i}" for i in range(10_000)] + ids, [], 8),
                     "8 IDs", id="10,000 unknown available IDs"),
        pytest.param("GetPreferredAllocation", lambda ids: pb.PreferredAllocationRequest(), "0 containers",
                     id="no container requests (preferred)"),
    ],
)
def test_malformed_request(whole: Served, logs: LogWatch, method: str, request_for: Case, expect: str) -> None:
    request = request_for(whole.ids)
    try:
        response = getattr(whole.stub, method)(request, timeout=WAIT_S)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        assert f"{code.name} " in expect and expect.split(" ", 1)[1] in details, f"{code.name}: {details[:300]}"
    else:
        assert not expect.startswith("INVALID_ARGUMENT"), f"expected an error, got {str(response)[:300]}"
        responses = list(response.container_responses)
        if expect.endswith("containers"):
            assert len(responses) == int(expect.split()[0])
        elif expect.startswith("NVIDIA_VISIBLE_DEVICES="):
            shown = responses[0].envs["NVIDIA_VISIBLE_DEVICES"]
            assert shown == expect.split("=", 1)[1].strip('"').replace("id0", whole.ids[0])
        else:
            containers = request.container_requests
            check_preferred(response, list(containers[0].available_deviceIDs),
                            list(containers[0].must_include_deviceIDs), containers[0].allocation_size, whole.ids)
            got = list(responses[0].deviceIDs)
            assert (got == []) if expect == "[]" else len(got) == int(expect.split()[0])
    # Still serving.
    answer = whole.stub.Allocate(allocate([whole.ids[1]]), timeout=WAIT_S)
    assert answer.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == whole.ids[1]


def test_10000_valid_replica_ids_in_one_request(shared: Served, logs: LogWatch) -> None:
    assert len(shared.ids) == 8 * SHARED_REPLICAS
    response = shared.stub.Allocate(allocate(shared.ids), timeout=WAIT_S)
    visible = response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"].split(",")
    assert sorted(visible) == sorted({physical_id(i) for i in shared.ids})  # each GPU once
    chosen = shared.stub.GetPreferredAllocation(prefer(shared.ids, [], 10_000), timeout=WAIT_S)
    check_preferred(chosen, shared.ids, [], 10_000, shared.ids)
    assert len(chosen.container_responses[0].deviceIDs) == 10_000


CORRUPT = {
    "broken wire format": b"\xff\xff\xff\xff",
    "trailing garbage": pb.RegisterRequest(version="v1beta1").SerializeToString() + b"\x00\x08",
    "bad UTF-8 in a string field": b"\x0a\x04\x0a\x02\xff\xfe",  # container_requests[0] -> an ID of 2 bytes
}


def test_corrupt_requests_are_invalid_argument_with_one_log_line(
    whole: Served, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    sent = 0
    for method in ("Allocate", "GetPreferredAllocation"):
        raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = whole.channel.unary_unary(f"/v1beta1.DevicePlugin/{method}")
        for _ in range(10):
            for what, garbage in CORRUPT.items():
                with pytest.raises(grpc.RpcError) as info:
                    raw(garbage, timeout=WAIT_S)
                sent += 1
                code, details = info.value.code(), info.value.details() or ""
                expected = (grpc.StatusCode.INVALID_ARGUMENT, f"malformed {method} request")
                assert (code, details.split(":")[0]) == expected, f"{what}: {code.name}: {details}"
                assert "<class" not in details and "Exception" not in details, details
        assert "bad UTF-8" in details  # the last one sent: the parser says what was wrong
    answer = whole.stub.Allocate(allocate([whole.ids[2]]), timeout=WAIT_S)
    assert answer.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == whole.ids[2]
    assert [r.getMessage() for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()] == []
    assert "Traceback" not in capfd.readouterr().err
    refused = [r for r in caplog.records if r.getMessage() == "malformed request refused"]
    print(f"{sent} corrupt requests: {len(refused)} log lines")
    assert sorted(getattr(r, "method", "") for r in refused) == ["Allocate", "GetPreferredAllocation"]  # one per method


# --- generated requests ----------------------------------------------------------------------

def id_lists(known: int) -> st.SearchStrategy[list[int | str]]:
    """Indexes into the known IDs (repeats allowed) mixed with arbitrary unknown strings."""
    return st.lists(st.one_of(st.integers(0, known - 1), st.text(max_size=60)), max_size=24)


def resolve(items: list[int | str], ids: list[str]) -> list[str]:
    return [ids[i] if isinstance(i, int) else i for i in items]


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(items=id_lists(8))
def test_generated_allocate(whole: Served, items: list[int | str]) -> None:
    wanted = resolve(items, whole.ids)
    try:
        response = whole.stub.Allocate(allocate(wanted), timeout=WAIT_S)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown device" in (exc.details() or "")
        assert any(i not in whole.ids for i in wanted)
        return
    assert all(i in whole.ids for i in wanted)
    visible = response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"]
    assert visible == ",".join(dict.fromkeys(wanted))


@PROPERTY
@given(available=id_lists(8), must=id_lists(8), size=st.integers(-(2**31), INT32_MAX))
def test_generated_preferred(whole: Served, available: list[int | str], must: list[int | str], size: int) -> None:
    request = prefer(resolve(available, whole.ids), resolve(must, whole.ids), size)
    response = whole.stub.GetPreferredAllocation(request, timeout=WAIT_S)
    check_preferred(response, resolve(available, whole.ids), resolve(must, whole.ids), size, whole.ids)
