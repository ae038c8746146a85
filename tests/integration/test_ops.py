"""Metrics, probes and structured logs of the real plugin, scraped over HTTP during fake-kubelet runs."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nvdp.app.plugin import Plugin
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.options import Config
from nvdp.core.devices import Resource
from nvdp.errors import ListenError
from nvdp.kubelet.server import ResourceServer
from nvdp.testing import FakeKubelet, eventually
from tests.conftest import running_plugin

GPU = "nvidia.com/gpu"
MakeConfig = Callable[..., Config]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
LOCAL = "127.0.0.1:0"
FAST = {"health_quiet_period": "0.2", "health_probe_interval": "0.05"}  # quick recoveries for tests


def _get(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


async def get(plugin: Plugin, path: str) -> tuple[int, str]:
    assert plugin.ops is not None
    status, _, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{plugin.ops.port}{path}")
    return status, body


async def scrape(plugin: Plugin) -> Samples:
    status, text = await get(plugin, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def readyz_turns(plugin: Plugin, status: int) -> str:
    """Poll /readyz until it answers `status`: the kubelet may open its stream a moment before the
    plugin has read the Register answer, so readiness follows registration by a few milliseconds."""
    body = ""

    async def answers() -> bool:
        nonlocal body
        code, body = await get(plugin, "/readyz")
        return code == status

    await eventually(answers, f"/readyz answering {status}", poll_s=0.02)
    return body


async def test_a_failed_multi_container_allocate_counts_no_success(
    kubelet: FakeKubelet, make_config: MakeConfig
) -> None:
    from nvdp.kubelet._proto import api_pb2 as pb

    async with running_plugin(make_config("dgx-h100", metrics_address=LOCAL)) as plugin:
        endpoint = await kubelet.wait_registered(GPU)
        ids = list(endpoint.devices)
        request = pb.AllocateRequest(container_requests=[
            pb.ContainerAllocateRequest(devices_ids=ids[:2]),
            pb.ContainerAllocateRequest(devices_ids=["GPU-not-here"]),
        ])
        with pytest.raises(grpc.aio.AioRpcError):
            await kubelet.plugin(GPU).stub.Allocate(request, timeout=10)
        after = await scrape(plugin)
        assert value(after, "nvdp_allocations_total", resource=GPU) == 0  # the pod got nothing
        assert value(after, "nvdp_allocated_devices_total", resource=GPU) == 0
        assert value(after, "nvdp_allocation_errors_total", resource=GPU, error="unknown_device") == 1


async def test_metrics_follow_allocations(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("dgx-h100", metrics_address=LOCAL)) as plugin:
        endpoint = await kubelet.wait_registered(GPU)
        await readyz_turns(plugin, 200)
        ids = list(endpoint.devices)
        before = await scrape(plugin)
        assert value(before, "nvdp_allocations_total", resource=GPU) == 0
        assert value(before, "nvdp_resource_registered", resource=GPU) == 1
        assert value(before, "nvdp_listandwatch_streams", resource=GPU) == 1
        assert value(before, "nvdp_registrations_total") == 1
        assert all(value(before, "nvdp_device_healthy", resource=GPU, device=i, gpu_uuid=i, reason="") == 1
                   for i in ids)

        await kubelet.preferred_allocation(GPU, ids, [], 2)
        await kubelet.allocate(GPU, ids[:2])
        await kubelet.allocate(GPU, ids[2:3])
        with pytest.raises(grpc.aio.AioRpcError):
            await kubelet.allocate(GPU, ["GPU-not-here"])
        after = await scrape(plugin)
        assert value(after, "nvdp_allocations_total", resource=GPU) == 2
        assert value(after, "nvdp_allocated_devices_total", resource=GPU) == 3
        assert value(after, "nvdp_allocation_errors_total", resource=GPU, error="unknown_device") == 1
        assert value(after, "nvdp_grpc_requests_total", resource=GPU, method="Allocate", code="OK") == 2
        assert value(after, "nvdp_grpc_requests_total", resource=GPU, method="Allocate", code="INVALID_ARGUMENT") == 1
        assert value(after, "nvdp_grpc_request_duration_seconds_count", resource=GPU, method="Allocate") == 3
        assert value(after, "nvdp_grpc_request_duration_seconds_count", resource=GPU,
                     method="GetPreferredAllocation") == 1
        assert value(after, "nvdp_grpc_request_duration_seconds_count", resource=GPU, method="ListAndWatch") == 1
        # The liveness probe's own call is not counted as kubelet traffic.
        options = value(after, "nvdp_grpc_requests_total", resource=GPU, method="GetDevicePluginOptions", code="OK")
        assert (await get(plugin, "/healthz"))[0] == 200
        assert value(await scrape(plugin), "nvdp_grpc_requests_total", resource=GPU,
                     method="GetDevicePluginOptions", code="OK") == options


def labelled(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """The series of a metric whose labels include these."""
    want = set(labels.items())
    return {key: v for (n, key), v in samples.items() if n == name and want <= key}


def reason_of(plugin: Plugin, device: str) -> str:
    return plugin.manager.tree[GPU].by_id[device].reason


async def test_metrics_follow_injected_faults(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("pcie-l40s", metrics_address=LOCAL, **FAST)) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=4)
        backend = plugin.backend
        assert isinstance(backend, SimulatedBackend)

        # A fatal XID: the device goes Unhealthy with the reason, and stays so.
        fatal = backend.inject_xid(1, 79).gpu
        await kubelet.wait_for(lambda: endpoint.devices[fatal].health == "Unhealthy")
        r79 = reason_of(plugin, fatal)
        assert r79.startswith("XID 79")
        samples = await scrape(plugin)
        assert value(samples, "nvdp_device_healthy", resource=GPU, device=fatal, gpu_uuid=fatal, reason=r79) == 0
        assert value(samples, "nvdp_health_transitions_total", resource=GPU, health="Unhealthy", reason=r79) == 1
        assert value(samples, "nvdp_xid_events_total", gpu_uuid=fatal, xid="79") == 1
        assert value(samples, "nvdp_health_events_total", gpu_uuid=fatal, kind="xid") == 1
        with pytest.raises(grpc.aio.AioRpcError):
            await kubelet.allocate(GPU, [fatal])
        assert value(await scrape(plugin), "nvdp_allocation_errors_total", resource=GPU, error="unhealthy_device") == 1

        # A transient XID: Unhealthy, then Healthy after the quiet period; both transitions counted.
        transient = backend.inject_xid(2, 94).gpu
        await kubelet.wait_for(lambda: endpoint.devices[transient].health == "Unhealthy")
        r94 = reason_of(plugin, transient)
        await kubelet.wait_for(lambda: endpoint.devices[transient].health == "Healthy", timeout=5)
        samples = await scrape(plugin)
        assert value(samples, "nvdp_health_transitions_total", resource=GPU, health="Unhealthy", reason=r94) == 1
        assert value(samples, "nvdp_health_transitions_total", resource=GPU, health="Healthy", reason=r94) == 1
        assert value(samples, "nvdp_device_healthy", resource=GPU, device=transient, gpu_uuid=transient,
                     reason="") == 1

        # An XID the policy ignores (13, an application error): counted, no health change.
        ignored = backend.inject_xid(3, 13).gpu
        await eventually(lambda: plugin.stats.snapshot().xid_events.get((ignored, 13)) == 1, "XID 13 counted")
        samples = await scrape(plugin)
        assert value(samples, "nvdp_device_healthy", resource=GPU, device=ignored, gpu_uuid=ignored, reason="") == 1
        assert sum(labelled(samples, "nvdp_health_transitions_total", health="Unhealthy").values()) == 2

        # An uncorrectable ECC event and a lost GPU: their own event kind and reason.
        ecc = backend.inject_ecc_event(0).gpu
        await kubelet.wait_for(lambda: endpoint.devices[ecc].health == "Unhealthy")
        samples = await scrape(plugin)
        assert value(samples, "nvdp_health_events_total", gpu_uuid=ecc, kind="ecc") == 1
        assert labelled(samples, "nvdp_device_healthy", device=ecc) == {
            frozenset({("resource", GPU), ("device", ecc), ("gpu_uuid", ecc), ("reason", reason_of(plugin, ecc))}): 0}
        backend.lose(3)
        await kubelet.wait_for(lambda: endpoint.devices[ignored].health == "Unhealthy")
        lost = reason_of(plugin, ignored)
        samples = await scrape(plugin)
        assert value(samples, "nvdp_health_transitions_total", resource=GPU, health="Unhealthy", reason=lost) == 1
        assert sum(value for value in labelled(samples, "nvdp_device_healthy").values()) == 1  # only GPU 2 is left


async def test_probes_flip_when_the_kubelet_goes_away(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("pcie-l40s", metrics_address=LOCAL)) as plugin:
        await kubelet.wait_registered(GPU, min_devices=4)
        assert await readyz_turns(plugin, 200) == "[+]registered:nvidia.com/gpu ok\nok\n"
        assert (await get(plugin, "/healthz"))[0] == 200

        await kubelet.stop()  # the kubelet dies: its ListAndWatch stream ends (and its kubelet.sock goes)
        await eventually(lambda: plugin.stats.open_streams(GPU) == 0, "no open ListAndWatch stream")
        status, body = await get(plugin, "/readyz")  # at once: the stream is the kubelet listening
        assert status == 503 and "[-]registered:nvidia.com/gpu failed: " in body
        assert (await get(plugin, "/healthz"))[0] == 200  # the plugin itself is fine: no restart wanted

        await kubelet.restart()  # a new kubelet: folder wiped, kubelet.sock re-created
        await kubelet.wait_registered(GPU, min_devices=4)
        await readyz_turns(plugin, 200)
        samples = await scrape(plugin)
        assert value(samples, "nvdp_kubelet_restarts_total") >= 1
        assert value(samples, "nvdp_registrations_total") == 2


async def test_readiness_waits_for_registration(plugin_dir: Path, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("pcie-l40s", metrics_address=LOCAL)) as plugin:
        status, body = await get(plugin, "/readyz")  # no kubelet yet
        assert status == 503 and "not registered with the kubelet" in body
        assert value(await scrape(plugin), "nvdp_resource_registered", resource=GPU) == 0
        async with FakeKubelet(str(plugin_dir)) as kubelet:
            await kubelet.wait_registered(GPU, min_devices=4)
            await readyz_turns(plugin, 200)


async def test_liveness_fails_when_a_server_does_not_answer(plugin_dir: Path, make_config: MakeConfig) -> None:
    from nvdp.ops.readiness import liveness

    plugin = Plugin(make_config("pcie-l40s"))
    resource = Resource(GPU, ())
    plugin.manager.servers[GPU] = ResourceServer(resource, plugin.manager.context, str(plugin_dir))  # never started
    result = await liveness(plugin.view, timeout=0.5)
    assert not result.ok
    assert "[-]server:nvidia.com/gpu failed: GetDevicePluginOptions" in result.text()


async def test_idle_plugin_is_alive_but_not_ready(
    tmp_path: Path, kubelet: FakeKubelet, make_config: MakeConfig
) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("gpus: []\n")
    async with running_plugin(make_config(str(empty), fail_on_init_error="false", metrics_address=LOCAL)) as plugin:
        assert (await get(plugin, "/healthz"))[0] == 200
        status, body = await get(plugin, "/readyz")
        assert status == 503 and "initialisation failed: no devices found" in body
        assert value(await scrape(plugin), "nvdp_init_failed") == 1


async def test_http_edges(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("h200", metrics_address=LOCAL)) as plugin:
        assert plugin.ops is not None
        base = f"http://127.0.0.1:{plugin.ops.port}"
        assert (await asyncio.to_thread(_get, base + "/nope"))[0] == 404
        assert (await asyncio.to_thread(_get, base + "/metrics", "POST"))[0] == 405
        status, headers, body = await asyncio.to_thread(_get, base + "/metrics", "HEAD")
        assert status == 200 and body == "" and int(headers["content-length"]) > 0
        _, headers, body = await asyncio.to_thread(
            _get, base + "/metrics", "GET", {"Accept": "application/openmetrics-text; version=1.0.0"})
        assert headers["content-type"].startswith("application/openmetrics-text") and body.endswith("# EOF\n")
        # Garbage instead of HTTP: a 400, and the listener keeps serving.
        reader, writer = await asyncio.open_connection("127.0.0.1", plugin.ops.port)
        writer.write(b"\x16\x03\x01 not http\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 400")
        writer.close()
        assert (await get(plugin, "/healthz"))[0] == 200


async def test_metrics_address_in_use_fails_before_touching_sockets(
    plugin_dir: Path, make_config: MakeConfig
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"--metrics-address 127.0.0.1:{port}"):
            async with running_plugin(make_config("h200", metrics_address=f"127.0.0.1:{port}")):
                pass
    assert list(plugin_dir.iterdir()) == []


async def test_metrics_are_off_by_default(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("h200")) as plugin:
        await kubelet.wait_registered(GPU)
        assert plugin.ops is None


async def test_status_shows_a_fault_injected_from_outside(
    kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path
) -> None:
    control = str(plugin_dir / "control.sock")
    cfg = make_config("pcie-l40s", metrics_address=LOCAL, simulate_control=control, **FAST)
    async with running_plugin(cfg) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=4)
        await readyz_turns(plugin, 200)
        assert plugin.ops is not None and plugin.node is not None
        sick = plugin.node.gpus[0].uuid
        nvdp = str(Path(sys.executable).parent / "nvdp")
        env = {k: v for k, v in os.environ.items() if not k.startswith("NVDP_")}
        env["NVDP_METRICS_ADDRESS"] = f"127.0.0.1:{plugin.ops.port}"

        async def run(*args: str) -> bytes:
            proc = await asyncio.create_subprocess_exec(nvdp, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err
            return out

        await run("simulate", "inject", "--control", control, "xid", "--gpu", "0", "--xid", "48")
        await kubelet.wait_for(lambda: endpoint.devices[sick].health == "Unhealthy")
        reason = reason_of(plugin, sick)
        assert reason.startswith("XID 48")

        view = json.loads(await run("status", "--json"))
        assert view["resources"] == [{"name": GPU, "registered": True, "streams": 1, "devices": 4, "healthy": 3,
                                      "allocations": 0, "allocation_errors": 0}]
        first = view["devices"][0]
        assert (first["device"], first["healthy"], first["reason"]) == (sick, False, reason)
        assert view["xid_events"] == {f"{sick}: XID 48": 1}
        text = (await run("status")).decode()
        assert "backend=simulated" in text and "3/4" in text
        assert f"{sick}  Unhealthy  {reason}" in text


def test_status_command_without_a_plugin_exits_1() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    result = subprocess.run([str(Path(sys.executable).parent / "nvdp"), "status", "--address", f"127.0.0.1:{port}"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "is the plugin running with --metrics-address?" in result.stderr and "Traceback" not in result.stderr


async def test_json_logs_from_the_real_process(plugin_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVDP_")}
    env["NVDP_LOG_FORMAT"] = "json"
    env["CONFIG_FILE"] = str(plugin_dir / "config.yaml")  # its sharing differs from the official plugin's: a warning
    (plugin_dir / "config.yaml").write_text(
        "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
        "    - {name: nvidia.com/gpu, replicas: 2, devices: [0]}\n"
    )
    async with FakeKubelet(str(plugin_dir)) as kubelet:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "nvidia-device-plugin"), "--simulate", "pcie-l40s",
             "--kubelet-socket", str(plugin_dir / "kubelet.sock")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            await kubelet.wait_registered(GPU, timeout=20, min_devices=5)
            proc.terminate()
            out, _ = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    events = [json.loads(line) for line in out.splitlines()]  # every line is one JSON object
    registered = [e for e in events if e["message"] == "registered with the kubelet"]
    assert registered and registered[0]["resource"] == GPU and registered[0]["level"] == "info"
    assert any("nvdp honours devices=[0]" in e["message"] and e["level"] == "warning" for e in events)
    assert events[-1]["message"] == "stopped"


def test_metrics_address_in_use_exits_1_without_traceback(plugin_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(Path(sys.executable).parent / "nvidia-device-plugin"), "--simulate", "h200",
             "--kubelet-socket", str(plugin_dir / "kubelet.sock"), "--metrics-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=30,
            env={k: v for k, v in os.environ.items() if not k.startswith("NVDP_")})
    assert result.returncode == 1
    assert f"--metrics-address 127.0.0.1:{port}: cannot listen" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(plugin_dir.iterdir()) == []
