"""The plugin as the operations side sees it (`ops.view.OpsView`): a copy of its state, and a
liveness answer from every resource server. The ops package never sees the Plugin itself."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from nvdp.app.health_monitor import HealthMonitor
from nvdp.app.mps import MpsGate
from nvdp.backends.base import GpuBackend
from nvdp.config.options import Config
from nvdp.core.devices import Node
from nvdp.errors import DiscoveryError
from nvdp.kubelet.liveness import answers
from nvdp.kubelet.manager import Manager
from nvdp.ops.counters import PluginStats
from nvdp.ops.view import Check, PluginState


class Observed(Protocol):
    """What the view reads of the plugin (app.plugin.Plugin has these)."""

    @property
    def manager(self) -> Manager: ...
    @property
    def stats(self) -> PluginStats: ...
    @property
    def node(self) -> Node | None: ...
    @property
    def backend(self) -> GpuBackend | None: ...
    @property
    def init_error(self) -> DiscoveryError | None: ...
    @property
    def cfg(self) -> Config: ...
    @property
    def health(self) -> HealthMonitor: ...
    @property
    def mps(self) -> MpsGate: ...


class PluginView:
    def __init__(self, plugin: Observed) -> None:
        self._plugin = plugin

    def state(self) -> PluginState:
        plugin = self._plugin
        manager, node, backend = plugin.manager, plugin.node, plugin.backend
        return PluginState(
            tree=manager.tree,
            registered=frozenset(manager.registered),
            registrations=manager.registrations,
            kubelet_restarts=manager.kubelet_restarts,
            stats=plugin.stats.snapshot(),
            backend=backend.name if backend is not None else "",
            driver_version=node.driver_version if node is not None else "",
            cuda_driver_version=node.cuda_driver_version if node is not None else 0,
            init_error=str(plugin.init_error) if plugin.init_error is not None else "",
            registers=manager.registers,
            simulated=bool(plugin.cfg.simulate),
            nvml_stuck_threads=plugin.health.stuck_threads,
            mps=plugin.mps.status,
        )

    async def answers(self, timeout: float) -> Sequence[Check]:
        servers = list(self._plugin.manager.servers.values())
        return await asyncio.gather(*(answers(s.name, s.socket_path, timeout) for s in servers))
