"""The collector renders one state snapshot; `nvdp status` reads that text back."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nvdp.core.devices import Device, Health, Resource
from nvdp.ops import metrics
from nvdp.ops.counters import PluginStats
from nvdp.ops.metrics import make_registry
from nvdp.ops.view import PluginState
from nvdp.tools.status import metrics_url, parse, render

GPU = "nvidia.com/gpu"
ROOT = Path(__file__).parents[2]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def dev(n: int, health: Health = Health.HEALTHY, reason: str = "") -> Device:
    return Device(f"GPU-{n}", f"GPU-{n}", str(n), (f"/dev/nvidia{n}",)).with_health(health, reason)


def state(stats: PluginStats | None = None, **overrides: object) -> PluginState:
    stats = stats or PluginStats()
    values: dict[str, object] = {
        "tree": {GPU: Resource(GPU, (dev(0), dev(1, Health.UNHEALTHY, "XID 79: fallen off the bus")))},
        "registered": frozenset({GPU}),
        "registrations": 3,
        "kubelet_restarts": 2,
        "stats": stats.snapshot(),
        "backend": "simulated",
        "driver_version": "580.159.04",
        "cuda_driver_version": 13000,
    }
    values.update(overrides)
    return PluginState(**values)  # type: ignore[arg-type]


def scrape(s: PluginState) -> tuple[str, Samples]:
    text = generate_latest(make_registry(lambda: s)).decode()
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return text, samples


def test_devices_registration_and_info() -> None:
    _, samples = scrape(state())
    assert samples["nvdp_device_healthy", frozenset(
        {("resource", GPU), ("device", "GPU-0"), ("gpu_uuid", "GPU-0"), ("reason", "")})] == 1
    assert samples["nvdp_device_healthy", frozenset(
        {("resource", GPU), ("device", "GPU-1"), ("gpu_uuid", "GPU-1"), ("reason", "XID 79: fallen off the bus")})] == 0
    assert samples["nvdp_resource_registered", frozenset({("resource", GPU)})] == 1
    assert samples["nvdp_listandwatch_streams", frozenset({("resource", GPU)})] == 0
    assert samples["nvdp_registrations_total", frozenset()] == 3
    assert samples["nvdp_kubelet_restarts_total", frozenset()] == 2
    assert samples["nvdp_init_failed", frozenset()] == 0
    assert samples["nvdp_node_info", frozenset(
        {("backend", "simulated"), ("driver_version", "580.159.04"), ("cuda_driver_version", "13.0")})] == 1
    assert any(name == "nvdp_build_info" for name, _ in samples)
    assert any(name == "process_resident_memory_bytes" for name, _ in samples)


def test_counters_and_histograms_come_from_the_stats() -> None:
    stats = PluginStats()
    stats.record_allocation(GPU, ["GPU-0"], None)
    stats.record_health_event("GPU-1", "xid", 79)
    stats.record_rpc(GPU, "Allocate", 0.0004, "OK")
    stats.record_rpc(GPU, "Allocate", 0.3, "OK")
    stats.observe_tree({GPU: Resource(GPU, (dev(1),))}, {GPU: Resource(GPU, (dev(1, Health.UNHEALTHY, "x"),))})
    _, samples = scrape(state(stats))
    assert samples["nvdp_allocations_total", frozenset({("resource", GPU)})] == 1
    assert samples["nvdp_allocated_devices_total", frozenset({("resource", GPU)})] == 1
    assert samples["nvdp_xid_events_total", frozenset({("gpu_uuid", "GPU-1"), ("xid", "79")})] == 1
    assert samples["nvdp_health_transitions_total", frozenset(
        {("resource", GPU), ("health", "Unhealthy"), ("reason", "x")})] == 1
    labels = {("resource", GPU), ("method", "Allocate")}
    assert samples["nvdp_grpc_request_duration_seconds_count", frozenset(labels)] == 2
    assert samples["nvdp_grpc_request_duration_seconds_bucket", frozenset(labels | {("le", "0.0005")})] == 1
    assert samples["nvdp_grpc_request_duration_seconds_bucket", frozenset(labels | {("le", "+Inf")})] == 2
    assert samples["nvdp_grpc_requests_total", frozenset(labels | {("code", "OK")})] == 1 + 1


def test_each_scrape_reads_the_state_again() -> None:
    current = {"state": state()}
    registry = make_registry(lambda: current["state"])
    assert b'reason="XID 79' in generate_latest(registry)
    current["state"] = state(tree={GPU: Resource(GPU, (dev(0), dev(1)))}, init_error="")
    assert b'reason="XID 79' not in generate_latest(registry)


def test_init_failure_and_no_backend() -> None:
    _, samples = scrape(state(tree={}, registered=frozenset(), backend="", init_error="NVML not found"))
    assert samples["nvdp_init_failed", frozenset()] == 1
    assert not any(name in ("nvdp_node_info", "nvdp_device_healthy") for name, _ in samples)


def test_status_reads_the_metrics_back() -> None:
    stats = PluginStats()
    stats.record_allocation(GPU, ["GPU-0"], None)
    stats.stream_opened(GPU)
    stats.record_health_event("GPU-1", "xid", 79)
    text, _ = scrape(state(stats))
    view = parse(text)
    assert (view.backend, view.driver_version, view.registrations, view.kubelet_restarts) == (
        "simulated", "580.159.04", 3, 2)
    resource = view.resources[GPU]
    assert (resource.registered, resource.streams, resource.devices, resource.healthy, resource.allocations) == (
        True, 1, 2, 1, 1)
    assert [(d.device, d.healthy, d.reason) for d in view.devices] == [
        ("GPU-0", True, ""), ("GPU-1", False, "XID 79: fallen off the bus")]
    assert view.xid_events == {"GPU-1: XID 79": 1}
    table = render(view)
    assert "Unhealthy  XID 79: fallen off the bus" in table
    assert "1/2" in table


def test_metrics_url() -> None:
    assert metrics_url(":9401") == "http://127.0.0.1:9401/metrics"
    assert metrics_url("0.0.0.0:9401") == "http://127.0.0.1:9401/metrics"
    assert metrics_url("[::]:9401") == "http://[::1]:9401/metrics"
    assert metrics_url("10.0.0.5:9401") == "http://10.0.0.5:9401/metrics"
    assert metrics_url("http://pod:9401") == "http://pod:9401/metrics"


def test_operations_doc_lists_every_metric() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    names = [v for k, v in vars(metrics).items() if k.isupper() and isinstance(v, str) and v.startswith("nvdp_")]
    counters = {metrics.REGISTRATIONS, metrics.KUBELET_RESTARTS, metrics.HEALTH_TRANSITIONS, metrics.XID_EVENTS,
                metrics.ALLOCATIONS, metrics.ALLOCATED_DEVICES, metrics.ALLOCATION_ERRORS, metrics.GRPC_REQUESTS}
    missing = [n for n in names if f"`{n}_total`" not in doc and f"`{n}`" not in doc]
    assert not missing, f"docs/operations.md does not list {missing}"
    assert all(f"`{n}_total`" in doc for n in counters)


def test_mps_daemon_readiness_is_a_metric() -> None:
    held = "nvidia-cuda-mps-control exited with status 1: Cannot find MPS control daemon process"
    _, samples = scrape(state(mps={"nvidia.com/gpu.shared": held, "nvidia.com/gpu.b": ""}))
    assert samples["nvdp_mps_daemon_ready", frozenset({("resource", "nvidia.com/gpu.shared"), ("reason", held)})] == 0
    assert samples["nvdp_mps_daemon_ready", frozenset({("resource", "nvidia.com/gpu.b"), ("reason", "")})] == 1
    _, none = scrape(state())
    assert not any(name == "nvdp_mps_daemon_ready" for name, _ in none)


def test_a_held_back_mps_resource_makes_the_plugin_not_ready() -> None:
    from nvdp.ops.readiness import readiness

    stats = PluginStats()
    stats.stream_opened(GPU)
    ready = state(stats, mps={"nvidia.com/gpu.shared": ""})
    assert readiness(ready).ok
    held = readiness(state(stats, mps={"nvidia.com/gpu.shared": "no answer"}))
    assert not held.ok and "[-]mps:nvidia.com/gpu.shared failed: no answer" in held.text()
    alone = readiness(state(stats, tree={}, mps={"nvidia.com/gpu.shared": "no answer"}))
    assert not alone.ok and alone.text().startswith("[-]mps:nvidia.com/gpu.shared failed: no answer")
    unregistered = readiness(state(stats, registers=False, mps={"nvidia.com/gpu.shared": "no answer"}))
    assert not unregistered.ok
