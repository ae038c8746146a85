"""Composition root: builds the backend, the device tree and the manager from a Config and runs
them until told to stop. Signals: SIGHUP reloads, SIGTERM/SIGINT stop. Only `cli` decides exit codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from nvdp.app.cdi import SpecPublisher
from nvdp.app.health_monitor import DEFAULT_TUNING, HealthMonitor, PumpTuning
from nvdp.backends.base import GpuBackend, HealthSource
from nvdp.config.options import Config
from nvdp.core import allocation, mig
from nvdp.core.devices import DeviceTree, Health, Node
from nvdp.core.health import HealthEvent, overlay, settings_from, transitions
from nvdp.core.resources import TreePlan, plan_tree
from nvdp.errors import ConfigError, DiscoveryError, NoDevicesFound, PluginError, ServeError
from nvdp.kubelet.instrument import instrument
from nvdp.kubelet.manager import Manager, RetryPolicy
from nvdp.kubelet.server import ResourceServer, ServingContext
from nvdp.ops.counters import PluginStats

if TYPE_CHECKING:
    from nvdp.backends.simulated.control import ControlServer
    from nvdp.ops.web import OpsServer

log = logging.getLogger("nvdp.app")  # stable name: operators filter on it

BackendFactory = Callable[[Config], GpuBackend]
# Config fields that need a new backend when they change (the rest only rebuild the tree).
# driver_root and dev_root only shape the device specs of Allocate (container.py), not discovery.
BACKEND_FIELDS = ("simulate", "container_driver_root", "device_discovery_strategy")


def open_backend(cfg: Config) -> GpuBackend:
    """The simulated backend when --simulate is set, real NVML otherwise."""
    if cfg.simulate:
        from nvdp.backends.simulated.backend import SimulatedBackend

        # --driver-root names where the simulated driver files go (CDI specs point there); default: a temp folder.
        return SimulatedBackend(cfg.simulate, driver_root=None if cfg.driver_root == "/" else cfg.driver_root)
    if cfg.device_discovery_strategy == "tegra":
        raise DiscoveryError("--device-discovery-strategy=tegra: Tegra (Jetson) discovery is not supported by nvdp")
    from nvdp.backends.nvml.discovery import NvmlBackend

    return NvmlBackend(driver_root=cfg.container_driver_root)


def plan_for(node: Node, cfg: Config) -> TreePlan:
    plan = plan_tree(node, cfg)
    for resource in plan.tree.values():
        allocation.prepare(resource, node.topology)  # so the first GetPreferredAllocation is fast
    return plan


def discover_plan(backend: GpuBackend, cfg: Config) -> tuple[Node, TreePlan]:
    node = backend.discover()
    plan = plan_for(node, cfg)
    if not plan.tree:
        raise NoDevicesFound(f"no devices found by the {backend.name} backend")
    return node, plan


def discover_once(cfg: Config, backend_factory: BackendFactory = open_backend) -> tuple[Node, TreePlan]:
    """Open a backend, discover, close it (whether or not discovery worked): `nvdp devices`."""
    backend = backend_factory(cfg)
    try:
        return discover_plan(backend, cfg)
    finally:
        backend.close()


def log_problems(problems: tuple[mig.Problem, ...], already_logged: frozenset[mig.Problem]) -> None:
    """Log what is new about the MIG layout (a rescan finding the same skipped device stays quiet)."""
    for problem in problems:
        if problem not in already_logged:
            level = logging.ERROR if problem.level == "error" else logging.WARNING
            log.log(level, problem.message, extra={"device": problem.device} if problem.device else None)


def single(exc: BaseException) -> BaseException:
    """The one error inside (nested) one-error groups, so callers can catch it by type; a group
    holding several errors is returned as it is."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Plugin:
    """The running plugin.

    Resource handling: `run()` owns the backend and every socket; both are released when it
    returns, whether by `stop()`, a signal or an error.
    Error handling: start-up DiscoveryError propagates when fail_on_init_error is set; otherwise
    it is logged and the plugin idles until SIGHUP or a MIG rescan (retry) or SIGTERM. A bad config
    on SIGHUP is logged and the running config is kept; a reload or rescan whose discovery fails
    keeps the running backend, health checks and devices (a new backend is opened and tried
    before the old one is closed). An unexpected error in the health checks stops the plugin and
    propagates from `run()`.

    Health: the advertised tree is always `overlay(discovered tree, health state)`; the health
    state survives reloads (a config reload does not repair a GPU).
    """

    def __init__(
        self,
        cfg: Config,
        backend_factory: BackendFactory = open_backend,
        reload_config: Callable[[], Config] | None = None,
        health_tuning: PumpTuning = DEFAULT_TUNING,
        retry: RetryPolicy | None = None,
        socket_dir: str | None = None,  # tests: where sockets go when --kubelet-socket is empty
    ) -> None:
        self.cfg = cfg
        self._backend_factory = backend_factory
        self._reload_config = reload_config
        self.backend: GpuBackend | None = None
        self.node: Node | None = None
        self.manager = Manager(
            cfg.kubelet_socket, ServingContext(cfg, Node(gpus=()).topology, ()), retry=retry, socket_dir=socket_dir
        )
        # Counters for metrics: Allocate and gRPC calls, applied trees, health events.
        self.stats = PluginStats()
        self.manager.on_new_server = self._instrument
        self.manager.on_apply = self.stats.observe_tree
        self.ops: OpsServer | None = None  # the /metrics, /healthz, /readyz listener, when asked for
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.started = asyncio.Event()  # set once serving (or idling after an init error)
        self.init_error: DiscoveryError | None = None
        self.discovered: DeviceTree = {}  # what discovery found, before the health overlay
        self.health = HealthMonitor(settings_from(cfg), self._publish, health_tuning)
        self.health.on_event = self._count_event
        self._publish_lock = asyncio.Lock()
        self._health_task: asyncio.Task[None] | None = None
        self._health_key: tuple[object, ...] | None = None
        self._backend_generation = 0
        self._control: ControlServer | None = None
        self._failure: BaseException | None = None
        self.rescans = 0  # rescans that found a changed node and applied it
        # One discovery-and-apply at a time: a slow rescan must not apply an older node over a reload.
        self._apply_lock = asyncio.Lock()
        self._settings_changed = asyncio.Event()  # wakes the rescan timer after a reload
        self._logged_problems: frozenset[mig.Problem] = frozenset()
        self._last_rescan_error: str | None = None
        self.cdi = SpecPublisher()  # the CDI spec files for the cdi-* list strategies

    def _instrument(self, server: ResourceServer) -> None:
        instrument(server, self.stats)

    def _count_event(self, event: HealthEvent) -> None:
        self.stats.record_health_event(event.gpu, event.kind.value, event.xid)

    def stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    async def run(self, handle_signals: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if handle_signals:
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        log.info("Running with config: %s", self.cfg.to_json())
        try:
            if self.cfg.metrics_address:  # first, so probes answer while discovery runs
                from nvdp.ops.web import OpsServer

                self.ops = OpsServer(self, self.cfg.metrics_address)
                await self.ops.start()
            await self._start()
            if self.cfg.simulate_control:
                await self._open_control(self.cfg.simulate_control)
            try:
                async with asyncio.TaskGroup() as tasks:
                    background = [
                        tasks.create_task(self.manager.keep_registered()),
                        tasks.create_task(self.manager.watch_folder()),
                        tasks.create_task(self._rescan_periodically()),
                    ]
                    await self._serve_until_stopped()
                    for task in background:
                        task.cancel()
            except BaseExceptionGroup as group:
                raise single(group) from None
        finally:
            await self._stop_health()
            if self._control is not None:
                await self._control.close()
            if self.ops is not None:
                await self.ops.close()
            with contextlib.suppress(Exception):
                await self.manager.close()
            if self.backend is not None:
                self.backend.close()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            log.info("stopped")
        if self._failure is not None:
            raise single(self._failure)

    async def _start(self) -> None:
        try:
            await self._load(self.cfg, new_backend=True)
            self.init_error = None
            failures = list(self.manager.serve_failures.values())
            if failures:  # at start-up a socket folder we cannot use is fatal
                raise ServeError(failures[0])
        except DiscoveryError as exc:
            if self.cfg.fail_on_init_error:
                raise
            self.init_error = exc
            log.error(
                "initialisation failed; fail-on-init-error=false, so idling until SIGHUP or SIGTERM",
                extra={"error": str(exc)},
            )
        self.started.set()

    async def _load(self, cfg: Config, new_backend: bool) -> None:
        async with self._apply_lock:
            if not new_backend and self.backend is not None:
                node, plan = await asyncio.to_thread(discover_plan, self.backend, cfg)
            else:
                # Open and discover with the new backend first: when that fails, the running
                # backend, its health checks and the served devices stay as they were.
                backend = await asyncio.to_thread(self._backend_factory, cfg)
                try:
                    node, plan = await asyncio.to_thread(discover_plan, backend, cfg)
                except BaseException:
                    if self.backend is not None:
                        backend.close()
                    else:  # nothing was running: keep it open for a rescan (and fault injection)
                        self._swap_backend(backend)
                    raise
                await self._stop_health()  # it watches the old backend, about to be closed
                self._swap_backend(backend)
            await self._serve(cfg, node, plan)

    def _swap_backend(self, backend: GpuBackend) -> None:
        old, self.backend = self.backend, backend
        self._backend_generation += 1
        if old is not None:
            old.close()

    async def _serve(self, cfg: Config, node: Node, plan: TreePlan) -> None:
        """The one place a discovered node becomes the served tree (start-up, reload, rescan)."""
        log_problems(plan.problems, self._logged_problems)
        self._logged_problems = frozenset(plan.problems)
        self.cfg, self.node, self.discovered = cfg, node, plan.tree
        cdi_classes = await asyncio.to_thread(self.cdi.refresh, cfg, node, self.backend)  # before registering
        await self._publish(ServingContext(cfg, node.topology, node.control_devices, cdi_classes))
        await self._watch_health(cfg, node)

    async def rescan(self) -> bool:
        """Rediscover the node and serve it if it changed (a new MIG layout): resources that appear
        are served and registered, vanished ones stop, unchanged ones keep their sockets and
        streams. Returns whether a new tree was applied. Errors are logged once and the running
        devices are kept."""
        if self.init_error is not None:
            return await self._retry_start()
        async with self._apply_lock:
            if self.backend is None:
                return False
            try:
                node = await asyncio.to_thread(self.backend.discover)
                if node == self.node:
                    self._last_rescan_error = None
                    return False
                plan = await asyncio.to_thread(plan_for, node, self.cfg)
            except DiscoveryError as exc:
                self._rescan_failed(exc)
                return False
            self._last_rescan_error = None
            log.info("node changed, serving the new layout", extra={"mig_layout": mig.describe_layout(node.gpus)})
            if not plan.tree:
                log.warning("no devices left to advertise; every resource stops")
            await self._serve(self.cfg, node, plan)
            self.rescans += 1
            return True

    async def _retry_start(self) -> bool:
        try:
            await self._load(self.cfg, new_backend=self.backend is None)
        except DiscoveryError as exc:
            self._rescan_failed(exc)
            return False
        self.init_error = None
        self._last_rescan_error = None
        log.info("initialised on rescan", extra={"resources": ",".join(self.manager.servers)})
        return True

    def _rescan_failed(self, exc: DiscoveryError) -> None:
        if str(exc) != self._last_rescan_error:
            log.error("rescan: discovery failed, keeping the running devices", extra={"error": str(exc)})
            self._last_rescan_error = str(exc)

    async def _rescan_periodically(self) -> None:
        """Every --mig-rescan-interval seconds (never when 0); a reload restarts the timer."""
        while True:
            self._settings_changed.clear()
            interval = self.cfg.mig_rescan_interval
            try:
                async with asyncio.timeout(interval if interval > 0 else None):
                    await self._settings_changed.wait()
            except TimeoutError:
                await self.rescan()

    async def _publish(self, context: ServingContext | None = None) -> None:
        """Advertise the discovered tree with the current health overlaid; log each device whose
        health changed (one line per device)."""
        async with self._publish_lock:
            state = self.health.state
            tree = overlay(self.discovered, state)
            for t in transitions(self.manager.tree, tree, state):
                healthy = t.health is Health.HEALTHY
                log.log(
                    logging.INFO if healthy else logging.WARNING,
                    "device healthy again" if healthy else "device unhealthy",
                    extra={"resource": t.resource, "device": t.device, "reason": t.reason or "-",
                           "xid": "-" if t.xid is None else t.xid},
                )
            await self.manager.apply(tree, context)

    async def _watch_health(self, cfg: Config, node: Node) -> None:
        """(Re)start the health checks when the backend, the GPUs or the health settings changed."""
        if not isinstance(self.backend, HealthSource):
            return
        settings = settings_from(cfg)
        key = (self._backend_generation, tuple(g.uuid for g in node.gpus), settings)
        if key == self._health_key and self._health_task is not None and not self._health_task.done():
            return
        await self._stop_health()
        self.health.settings = settings
        self._health_key = key
        self._health_task = asyncio.create_task(self.health.watch(self.backend, node), name="health")
        self._health_task.add_done_callback(self._health_done)

    def _health_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._failure = task.exception()
        log.error("health checking failed; stopping", extra={"error": repr(self._failure)})
        self.stop()

    async def _stop_health(self) -> None:
        task, self._health_task = self._health_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _open_control(self, path: str) -> None:
        from nvdp.backends.simulated.control import ControlContext, ControlServer

        self._control = ControlServer(path, ControlContext(lambda: self.backend, self.request_reload, self.rescan))
        await self._control.start()

    async def _serve_until_stopped(self) -> None:
        while not self._stop.is_set():
            stop = asyncio.ensure_future(self._stop.wait())
            reload = asyncio.ensure_future(self._reload.wait())
            await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            reload.cancel()
            if self._reload.is_set() and not self._stop.is_set():
                self._reload.clear()
                await self.reload()

    async def reload(self) -> None:
        """SIGHUP: re-read the config, rediscover, and apply the new tree (unchanged resources keep
        their sockets and streams)."""
        try:
            cfg = self._reload_config() if self._reload_config else self.cfg
        except ConfigError as exc:
            log.error("reload: invalid configuration, keeping the running one", extra={"error": str(exc)})
            return
        new_backend = self.init_error is not None or any(
            getattr(cfg, f) != getattr(self.cfg, f) for f in BACKEND_FIELDS
        )
        try:
            await self._load(cfg, new_backend=new_backend)
            self.init_error = None
            log.info("reloaded", extra={"resources": ",".join(self.manager.servers)})
        except DiscoveryError as exc:
            log.error("reload: discovery failed, keeping the running devices", extra={"error": str(exc)})
        except PluginError as exc:  # e.g. ConfigError: the backend factory rejects a --simulate profile
            log.error("reload: failed, keeping the running config and devices", extra={"error": str(exc)})
        self._settings_changed.set()
