"""The config-manager's /metrics and /healthz (`--metrics-address`, nvdp only).

Metric names (docs/configuration.md lists them):
  nvdp_config_manager_info{config,source,label}   1: the applied config and why it was chosen
  nvdp_config_manager_label_unknown{value}        1 while the label names a config that does not exist
  nvdp_config_manager_problem                     1 while a change could not be applied (see the log)
  nvdp_config_manager_api_up                      1 when the last call to the API server succeeded
  nvdp_config_manager_switches_total, _signals_total, _signals_skipped_total, _api_errors_total,
  nvdp_config_manager_events_total
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from nvdp.ops.manager_state import ManagerState
from nvdp.ops.web import HttpListener, Reply

PREFIX = "nvdp_config_manager"


class ManagerCollector(Collector):
    def __init__(self, read: Callable[[], ManagerState]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        s = self._read()
        info = GaugeMetricFamily(f"{PREFIX}_info", "the applied config and why it was chosen",
                                 labels=["config", "source", "label"])
        info.add_metric([s.config, s.source, s.label], 1)
        yield info
        unknown = GaugeMetricFamily(f"{PREFIX}_label_unknown", "1 while the node label names a config that "
                                    "does not exist (the current config is kept)", labels=["value"])
        unknown.add_metric([s.unknown_label], 1 if s.unknown_label else 0)
        yield unknown
        yield GaugeMetricFamily(f"{PREFIX}_problem", "1 while a config change could not be applied",
                                value=1 if s.problem else 0)
        yield GaugeMetricFamily(f"{PREFIX}_api_up", "1 when the last call to the API server succeeded",
                                value=1 if s.api_up else 0)
        for name, text, value in (
            ("switches", "times the config link was re-pointed", s.switches),
            ("signals", "signals sent to the plugin", s.signals),
            ("signals_skipped", "changes made while the plugin was not running (no signal needed)",
             s.signals_skipped),
            ("api_errors", "failed calls to the API server", s.api_errors),
            ("events", "Kubernetes Events posted", s.events_posted),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", text, value=value)


def registry(read: Callable[[], ManagerState]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ManagerCollector(read))
    return reg


def render(state: ManagerState) -> bytes:
    return generate_latest(registry(lambda: state))


class ManagerListener(HttpListener):
    paths = ("/metrics", "/healthz")

    def __init__(self, state: ManagerState, address: str) -> None:
        super().__init__(address)
        self.state = state

    async def answer(self, path: str, accept: str) -> Reply:
        if path == "/healthz":  # answered on the loop: the process is alive and not stuck
            return Reply(200, b"ok\n")
        encoder, content_type = choose_encoder(accept)
        body = await asyncio.to_thread(encoder, registry(lambda: self.state))
        return Reply(200, body, content_type)
