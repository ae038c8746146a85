"""Prometheus metrics, built at scrape time from the plugin's current state.

A custom collector on an explicit `CollectorRegistry` (no global registry, no module-level
metric objects): every scrape calls `read()`, which returns one `ops.view.PluginState` (the current device
tree, the registration state and the `PluginStats` counters, copied at once), and the collector turns that one snapshot
into metric families. Nothing is cached between scrapes, so nothing can be stale.
docs/operations.md lists every metric; a test keeps that list and this module in step.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from nvdp import __version__
from nvdp.ops.counters import StatsSnapshot
from nvdp.ops.view import PluginState

# Metric names (counters get "_total" appended by the client library). `nvdp status` reads these.
BUILD_INFO = "nvdp_build_info"
NODE_INFO = "nvdp_node_info"
INIT_FAILED = "nvdp_init_failed"
DEVICE_HEALTHY = "nvdp_device_healthy"
RESOURCE_REGISTERED = "nvdp_resource_registered"
STREAMS = "nvdp_listandwatch_streams"
REGISTRATIONS = "nvdp_registrations"
KUBELET_RESTARTS = "nvdp_kubelet_restarts"
HEALTH_TRANSITIONS = "nvdp_health_transitions"
HEALTH_EVENTS = "nvdp_health_events"
XID_EVENTS = "nvdp_xid_events"
XID_RECOVERY_ACTIONS = "nvdp_xid_recovery_actions"
NVML_TIMEOUTS = "nvdp_nvml_timeouts"
NVML_STUCK_THREADS = "nvdp_nvml_stuck_threads"
HYGIENE_REFUSALS = "nvdp_gpu_hygiene_refusals"
CLUSTER_UPDATES = "nvdp_cluster_updates"
ALLOCATIONS = "nvdp_allocations"
ALLOCATED_DEVICES = "nvdp_allocated_devices"
ALLOCATION_ERRORS = "nvdp_allocation_errors"
GRPC_DURATION = "nvdp_grpc_request_duration_seconds"
GRPC_REQUESTS = "nvdp_grpc_requests"
MPS_DAEMON_READY = "nvdp_mps_daemon_ready"


def _cuda_version(encoded: int) -> str:
    """NVML's 13000 -> "13.0"."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}" if encoded else ""


def _counter(name: str, documentation: str, labels: list[str], counts: Mapping[Any, int]) -> CounterMetricFamily:
    """A counter family from a count per label tuple (or per single label value); values become text."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, n in sorted(counts.items()):
        family.add_metric([str(k) for k in (key if isinstance(key, tuple) else (key,))], n)
    return family


class PluginCollector(Collector):
    def __init__(self, read: Callable[[], PluginState]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return ()  # the families depend on the state; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        state = self._read()
        yield from self._info(state)
        yield from self._devices(state)
        yield from self._kubelet(state)
        yield from self._mps(state)
        yield from self._health(state.stats)
        yield from self._steering(state)
        yield from self._allocations(state.stats)
        yield from self._grpc(state.stats)

    def _info(self, state: PluginState) -> Iterator[Metric]:
        build = GaugeMetricFamily(BUILD_INFO, 'nvdp version and Python version; simulated="true" on a simulated '
                                  "node (fake GPUs, --simulate) (value 1)",
                                  labels=["version", "python_version", "simulated"])
        build.add_metric([__version__, platform.python_version(), "true" if state.simulated else "false"], 1)
        yield build
        node = GaugeMetricFamily(NODE_INFO, "the discovery backend and driver versions (value 1)",
                                 labels=["backend", "driver_version", "cuda_driver_version"])
        if state.backend:
            node.add_metric([state.backend, state.driver_version, _cuda_version(state.cuda_driver_version)], 1)
        yield node
        yield GaugeMetricFamily(INIT_FAILED, "1 while initialisation has failed and the plugin idles "
                                "(fail-on-init-error=false), else 0", value=1 if state.init_error else 0)

    def _devices(self, state: PluginState) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(DEVICE_HEALTHY, "1 when the device is advertised Healthy, 0 when Unhealthy",
                                    labels=["resource", "device", "gpu_uuid", "reason"])
        for name, resource in state.tree.items():
            for d in resource.devices:
                healthy.add_metric([name, d.id, d.gpu_uuid, d.reason], 1 if d.healthy else 0)
        yield healthy

    def _kubelet(self, state: PluginState) -> Iterator[Metric]:
        registered = GaugeMetricFamily(RESOURCE_REGISTERED, "1 when the resource is registered with the kubelet",
                                       labels=["resource"])
        streams = GaugeMetricFamily(STREAMS, "open ListAndWatch streams (the kubelet holds one per resource)",
                                    labels=["resource"])
        for name in state.tree:
            registered.add_metric([name], 1 if name in state.registered else 0)
            streams.add_metric([name], state.stats.streams.get(name, 0))
        yield registered
        yield streams
        yield CounterMetricFamily(REGISTRATIONS, "successful Register calls to the kubelet",
                                  value=state.registrations)
        yield CounterMetricFamily(KUBELET_RESTARTS, "kubelet restarts seen (kubelet.sock re-created)",
                                  value=state.kubelet_restarts)

    def _mps(self, state: PluginState) -> Iterator[Metric]:
        ready = GaugeMetricFamily(MPS_DAEMON_READY, "1 when the MPS resource's control daemon answers (it is "
                                  "served), 0 while it does not (held back; reason says why)",
                                  labels=["resource", "reason"])
        for name, why in sorted(state.mps.items()):
            ready.add_metric([name, why], 0 if why else 1)
        yield ready

    def _health(self, stats: StatsSnapshot) -> Iterator[Metric]:
        yield _counter(HEALTH_TRANSITIONS, "devices changing health, by the new health and the reason",
                       ["resource", "health", "reason"], stats.health_transitions)
        yield _counter(HEALTH_EVENTS, "health events reported by the driver, by GPU and kind "
                       "(xid, ecc, ecc-corrected)",
                       ["gpu_uuid", "kind"], stats.health_events)
        yield _counter(XID_EVENTS, "XID events reported by the driver, by GPU and XID",
                       ["gpu_uuid", "xid"], stats.xid_events)

    def _steering(self, state: PluginState) -> Iterator[Metric]:
        """Recovery actions, NVML deadlines, GPU hygiene and --cluster-health (docs/health.md)."""
        stats = state.stats
        yield _counter(XID_RECOVERY_ACTIONS, "XID events by the GPU recovery action the driver asked "
                       "for with them (where it reports one)",
                       ["gpu_uuid", "xid", "action"], stats.xid_recovery_actions)
        yield _counter(NVML_TIMEOUTS, "NVML calls on the health path that passed their deadline, "
                       "by kind (probe, subscribe, event-wait, usage)",
                       ["call"], stats.nvml_timeouts)
        yield GaugeMetricFamily(NVML_STUCK_THREADS, "threads left behind inside an NVML call that passed its "
                                "deadline and has not returned", value=state.nvml_stuck_threads)
        yield _counter(HYGIENE_REFUSALS, "PreStartContainer calls refused by --gpu-hygiene, by "
                       "resource, GPU and why (dirty, nvml-timeout)",
                       ["resource", "gpu_uuid", "why"], stats.hygiene_refusals)
        yield _counter(CLUSTER_UPDATES, "Kubernetes API calls made for --cluster-health, by kind "
                       "(event, condition, taint) and outcome (ok, error)",
                       ["kind", "outcome"], stats.cluster_updates)

    def _allocations(self, stats: StatsSnapshot) -> Iterator[Metric]:
        allocations = CounterMetricFamily(ALLOCATIONS, "container requests answered by Allocate",
                                          labels=["resource"])
        devices = CounterMetricFamily(ALLOCATED_DEVICES, "device IDs handed out by Allocate", labels=["resource"])
        for resource, n in sorted(stats.allocations.items()):
            allocations.add_metric([resource], n)
            devices.add_metric([resource], stats.allocated_devices.get(resource, 0))
        yield allocations
        yield devices
        yield _counter(ALLOCATION_ERRORS, "container requests refused by Allocate, by error",
                       ["resource", "error"], stats.allocation_errors)

    def _grpc(self, stats: StatsSnapshot) -> Iterator[Metric]:
        duration = HistogramMetricFamily(
            GRPC_DURATION, "device-plugin gRPC call latency (ListAndWatch: time to the first message)",
            labels=["resource", "method"])
        for (resource, method), histogram in sorted(stats.rpc_latency.items()):
            buckets = [("+Inf" if bound == float("inf") else repr(bound), n) for bound, n in histogram.cumulative()]
            duration.add_metric([resource, method], buckets, histogram.total)
        yield duration
        yield _counter(GRPC_REQUESTS, "device-plugin gRPC calls by status code",
                       ["resource", "method", "code"], stats.rpc_codes)


def make_registry(read: Callable[[], PluginState]) -> CollectorRegistry:
    """The plugin's collector plus the process collector (CPU, memory, open files)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PluginCollector(read))
    ProcessCollector(registry=registry)
    return registry
