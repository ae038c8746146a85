"""Composition root: builds the backend, the device tree and the manager from a Config and runs
them until told to stop. Signals: SIGHUP reloads, SIGTERM/SIGINT stop. Only `cli` decides exit codes.

Everything long-lived runs as a child of one TaskGroup (registration, the folder watch, the MIG
rescan timer, the health checks); everything that must be released (the backend, the resource
servers and their sockets, the operations listener, the fault-injection socket) is closed by one
AsyncExitStack, in the reverse order of opening, however `run()` ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nvdp.app import early_signals, preflight
from nvdp.app.cdi import SpecPublisher
from nvdp.app.discovery import BackendFactory, discover, needs_new_backend, open_backend, plan
from nvdp.app.health_monitor import DEFAULT_TUNING, HealthMonitor, HealthTask, PumpTuning
from nvdp.app.hygiene import GpuHygiene
from nvdp.app.mps import DEFAULT_MPS_TIMING, MpsGate, MpsTiming
from nvdp.app.ops_view import PluginView
from nvdp.backends.base import GpuBackend, HealthSource
from nvdp.config.options import Config, changed_settings
from nvdp.core import mig
from nvdp.core.backoff import Backoff
from nvdp.core.devices import DeviceTree, Health, Node, diff
from nvdp.core.health import HealthEvent, gpu_health, overlay, settings_from, transitions
from nvdp.core.resources import TreePlan
from nvdp.core.xid_policy import recovery_label
from nvdp.errors import ConfigError, DiscoveryError, PluginError, ServeError
from nvdp.kubelet.instrument import instrumented_servers
from nvdp.kubelet.manager import Manager, RetryPolicy
from nvdp.kubelet.server import ServingContext
from nvdp.ops.cluster import RETRY as CLUSTER_RETRY
from nvdp.ops.cluster import ClusterApi, ClusterReporter
from nvdp.ops.counters import PluginStats
from nvdp.ops.logs import LogOnce

if TYPE_CHECKING:
    from nvdp.ops.web import OpsServer

log = logging.getLogger("nvdp.app")  # stable name: operators filter on it
# Retrying a socket folder that is missing at start-up (fail-on-init-error=false).
SOCKET_RETRY_FIRST_S = 0.1
SOCKET_RETRY_MAX_S = 10.0


def unwrap_group(exc: BaseException) -> BaseException:
    """The one error inside (nested) one-error groups, so callers can catch it by type; a group
    holding several errors is returned as it is."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _restore_signal(loop: asyncio.AbstractEventLoop, sig: signal.Signals, before: Any) -> None:
    loop.remove_signal_handler(sig)
    if before is not None:
        signal.signal(sig, before)


class Request(enum.Enum):
    RELOAD = "reload"
    STOP = "stop"


@dataclass(frozen=True)
class Served:
    """What is being served: the config, the discovered node and its tree before the health
    overlay. Replaced as a whole at start-up, reload and rescan."""

    cfg: Config
    node: Node | None = None
    tree: DeviceTree = field(default_factory=dict)


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
        cluster_api: ClusterApi | None = None,  # with --cluster-health: where Events and the condition go
        cluster_retry: Backoff = CLUSTER_RETRY,  # tests shorten the back-off after a failed API call
        mps_timing: MpsTiming = DEFAULT_MPS_TIMING,
    ) -> None:
        self._backend_factory = backend_factory
        self._reload_config = reload_config
        self.served = Served(cfg)
        # Counters for metrics: Allocate and gRPC calls, applied trees, health events.
        self.stats = PluginStats()
        self.health = HealthMonitor(settings_from(cfg), self._publish, health_tuning, on_event=self._count_event,
                                    on_timeout=self.stats.record_nvml_timeout)
        # What the cluster sees (--cluster-health; read at start, like the API client it needs).
        self.cluster: ClusterReporter | None = None
        if cfg.cluster_health and cluster_api is not None:
            self.cluster = ClusterReporter(cluster_api, cfg.node_name, cfg.taint_on_fatal, self.stats, cluster_retry)
        # PreStartContainer's check; it acts only while --gpu-hygiene is on (docs/health.md).
        hygiene = GpuHygiene(self.health, lambda: self.backend, lambda: self.cfg, self.stats)
        self.manager = Manager(
            cfg.kubelet_socket,
            ServingContext(cfg, Node(gpus=()).topology, ()),
            retry=retry,
            socket_dir=socket_dir,
            server_factory=instrumented_servers(self.stats, pre_start=hygiene),
            on_apply=self.stats.observe_tree,
        )
        self._health_task = HealthTask(self.health)
        self.mps = MpsGate(self._publish, mps_timing)  # MPS resources wait for their control daemon
        self.backend: GpuBackend | None = None
        self._backend_generation = 0  # bumped on every new backend: the health checks follow it
        self.view = PluginView(self)  # what metrics and probes may read
        self.ops: OpsServer | None = None  # the OpsServer (/metrics, /healthz, /readyz), when --metrics-address is set
        # Set once serving (or idling after an init error), with the listeners open.
        self.started = asyncio.Event()
        self.init_error: DiscoveryError | None = None
        self.rescans = 0  # rescans that found a changed node and applied it
        self._requests: asyncio.Queue[Request] = asyncio.Queue()
        self._stop_requested = asyncio.Event()
        self._tasks: asyncio.TaskGroup | None = None  # the root TaskGroup, while run() runs
        self._children: set[asyncio.Task[None]] = set()
        # One discovery-and-apply at a time: a slow rescan must not apply an older node over a reload.
        self._apply_lock = asyncio.Lock()
        # One overlay-and-apply at a time: a health change and a reload must not apply out of order.
        self._publish_lock = asyncio.Lock()
        self._settings_changed = asyncio.Event()  # wakes the rescan timer after a reload
        self._problems_logged: frozenset[mig.Problem] = frozenset()
        self._rescan_failure = LogOnce()
        self.cdi = SpecPublisher()  # the CDI spec files for the cdi-* list strategies

    # Read-only views of what is served (tests, tools and the ops view read these).
    @property
    def cfg(self) -> Config:
        return self.served.cfg

    @property
    def node(self) -> Node | None:
        return self.served.node

    @property
    def discovered(self) -> DeviceTree:
        return self.served.tree

    def _count_event(self, event: HealthEvent) -> None:
        action = None if event.recovery_action is None else recovery_label(event.recovery_action)
        self.stats.record_health_event(event.gpu, event.kind.value, event.xid, action)

    def stop(self) -> None:
        self._stop_requested.set()
        self._requests.put_nowait(Request.STOP)

    def request_reload(self) -> None:
        self._requests.put_nowait(Request.RELOAD)

    async def run(self, handle_signals: bool = False) -> None:
        try:
            async with contextlib.AsyncExitStack() as resources:
                if handle_signals:  # first: from here on a stop request also ends a start-up under way
                    self._handle_signals(resources)
                log.info("Running with config", extra={"config": self.cfg.to_v1()})  # as upstream, in v1 names
                preflight.check(self.cfg)  # before anything is opened: a ConfigError here touched nothing
                preflight.announce(self.cfg)
                resources.callback(self._close_backend)  # closed last, after every server stopped
                resources.push_async_callback(self.manager.close)
                async with asyncio.TaskGroup() as tasks:
                    self._tasks = tasks
                    # Discovery and planning first: a config error found there (a device list over
                    # the kubelet's limit) exits 2 before any listener is opened.
                    if await self._start_unless_stopped():
                        if self.cfg.metrics_address:
                            from nvdp.ops.web import OpsServer

                            listener = OpsServer(self.view, self.cfg.metrics_address)
                            self.ops = await resources.enter_async_context(listener)
                        if self.cfg.simulate_control:
                            await self._open_control(self.cfg.simulate_control, resources)
                        if self.cluster is not None:
                            resources.push_async_callback(self.cluster.close)  # its API client's connections
                            self._spawn(self.cluster.run(), "cluster-health")
                        self._spawn(self.manager.keep_registered(), "registration")
                        self._spawn(self.manager.watch_folder(), "folder-watch")
                        self._spawn(self._rescan_periodically(), "rescan")
                        self.started.set()
                        await self._serve_until_stopped()
                    await self._health_task.stop()
                    for child in list(self._children):
                        child.cancel()
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
        finally:
            self._tasks = None
            log.info("stopped")

    async def _start_unless_stopped(self) -> bool:
        """Start; a stop requested meanwhile cancels the start-up (a slow discovery's worker
        thread finishes on its own) and returns False."""
        start = asyncio.ensure_future(self._start())
        stopped = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not start.done():
            start.cancel()
            await asyncio.wait({start})
            log.info("stop requested during start-up; not serving")
            return False
        start.result()  # a start-up error propagates
        return True

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        assert self._tasks is not None
        task = self._tasks.create_task(coro, name=name)
        self._children.add(task)
        task.add_done_callback(self._children.discard)
        return task

    def _handle_signals(self, resources: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        handlers = {signal.SIGTERM: self.stop, signal.SIGINT: self.stop, signal.SIGHUP: self.request_reload}
        for sig, handler in handlers.items():
            before = signal.getsignal(sig)  # the console script's early handler, or the default
            loop.add_signal_handler(sig, handler)
            resources.callback(_restore_signal, loop, sig, before)
        if early_signals.take_reload():  # a SIGHUP during start-up (app/early_signals.py)
            self.request_reload()

    def _close_backend(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.close()

    async def _start(self) -> None:
        try:
            await self._load(self.cfg, new_backend=True)
            self.init_error = None
            failures = list(self.manager.serve_failures.values())
            if failures and self.cfg.fail_on_init_error:  # at start-up a socket folder we cannot use is fatal
                raise ServeError(failures[0])
            if failures:
                self._spawn(self._wait_for_socket_folder(failures[0]), "socket-folder")
        except DiscoveryError as exc:
            if self.cfg.fail_on_init_error:
                raise
            self.init_error = exc
            log.error(
                "initialisation failed; fail-on-init-error=false, so idling until SIGHUP or SIGTERM",
                extra={"error": str(exc)},
            )

    async def _wait_for_socket_folder(self, failure: str) -> None:
        """fail-on-init-error=false and the sockets cannot be bound (the kubelet folder is not
        mounted yet): say so once, then retry with back-off (a folder change wakes the retry
        sooner when registration watches the folder) until every resource is served."""
        folder = self.manager.socket_dir
        log.warning("cannot serve yet; fail-on-init-error=false, so waiting for the socket folder and retrying "
                    "with back-off",
                    extra={"socket_dir": folder, "error": failure})
        backoff = Backoff(SOCKET_RETRY_FIRST_S, SOCKET_RETRY_MAX_S)
        failures = 0
        while self.manager.serve_failures:
            failures += 1
            await asyncio.sleep(backoff.delay(failures))
            await self.manager.check_sockets()
        log.info("serving", extra={"socket_dir": folder, "resources": ",".join(self.manager.servers)})

    async def _load(self, cfg: Config, new_backend: bool) -> None:
        async with self._apply_lock:
            if not new_backend and self.backend is not None:
                node, planned = await asyncio.to_thread(discover, self.backend, cfg)
            else:
                # Open and discover with the new backend first: when that fails, the running
                # backend, its health checks and the served devices stay as they were.
                backend = await asyncio.to_thread(self._backend_factory, cfg)
                try:
                    node, planned = await asyncio.to_thread(discover, backend, cfg)
                except BaseException:
                    if self.backend is not None:
                        backend.close()
                    else:  # nothing was running: keep it open for a rescan (and fault injection)
                        self._swap_backend(backend)
                    raise
                await self._health_task.stop()  # it watches the old backend, about to be closed
                self._swap_backend(backend)
            await self._serve(cfg, node, planned)

    def _swap_backend(self, backend: GpuBackend) -> None:
        old, self.backend = self.backend, backend
        self._backend_generation += 1
        if old is not None:
            old.close()

    async def _serve(self, cfg: Config, node: Node, planned: TreePlan) -> None:
        """The one place a discovered node becomes the served tree (start-up, reload, rescan)."""
        self._log_new_problems(planned.problems)
        self.served = Served(cfg, node, planned.tree)
        cdi_classes = await asyncio.to_thread(self.cdi.refresh, cfg, node, self.backend)  # before registering
        self.mps.watch(planned.mps, cfg, self._spawn)
        await self._publish(ServingContext(cfg, node.topology, node.control_devices, cdi_classes))
        await self._watch_health(cfg, node)

    def _log_new_problems(self, problems: tuple[mig.Problem, ...]) -> None:
        """Log what is new about the MIG layout (a rescan finding the same skipped device stays quiet)."""
        for problem in problems:
            if problem not in self._problems_logged:
                level = logging.ERROR if problem.level == "error" else logging.WARNING
                log.log(level, problem.message, extra={"device": problem.device} if problem.device else None)
        self._problems_logged = frozenset(problems)

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
                    self._rescan_failure.forget()
                    return False
                planned = await asyncio.to_thread(plan, node, self.cfg)
            except (DiscoveryError, ConfigError) as exc:  # ConfigError: the sharing no longer fits the node
                self._rescan_failed(exc)
                return False
            self._rescan_failure.forget()
            log.info("node changed, serving the new layout", extra={"mig_layout": mig.describe_layout(node.gpus)})
            if not planned.tree:
                log.warning("no devices left to advertise; every resource stops")
            await self._serve(self.cfg, node, planned)
            self.rescans += 1
            return True

    async def _retry_start(self) -> bool:
        try:
            await self._load(self.cfg, new_backend=self.backend is None)
        except DiscoveryError as exc:
            self._rescan_failed(exc)
            return False
        self.init_error = None
        self._rescan_failure.forget()
        log.info("initialised on rescan", extra={"resources": ",".join(self.manager.servers)})
        return True

    def _rescan_failed(self, exc: DiscoveryError | ConfigError) -> None:
        if self._rescan_failure.first(str(exc)):
            log.error("rescan: discovery failed, keeping the running devices", extra={"error": str(exc)})

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
            tree = self.mps.hold_back(overlay(self.discovered, state))
            for t in transitions(self.manager.tree, tree, state):
                healthy = t.health is Health.HEALTHY
                log.log(
                    logging.INFO if healthy else logging.WARNING,
                    "device healthy again" if healthy else "device unhealthy",
                    extra={"resource": t.resource, "device": t.device, "reason": t.reason or "-",
                           "xid": "-" if t.xid is None else t.xid},
                )
            await self.manager.apply(tree, context)
            if self.cluster is not None and self.node is not None:
                self.cluster.observe(gpu_health(state, self.node.gpus))

    async def _watch_health(self, cfg: Config, node: Node) -> None:
        """(Re)start the health checks when the backend, the GPUs or the health settings changed."""
        if not isinstance(self.backend, HealthSource) or self._tasks is None:
            return
        settings = settings_from(cfg)
        key = (self._backend_generation, tuple(g.uuid for g in node.gpus), settings)
        await self._health_task.ensure(self._tasks, self.backend, node, settings, key)

    async def _open_control(self, path: str, resources: contextlib.AsyncExitStack) -> None:
        from nvdp.backends.simulated.control import ControlContext, ControlServer

        control = ControlServer(path, ControlContext(lambda: self.backend, self.request_reload, self.rescan),
                                kubelet_socket=self.cfg.kubelet_socket)
        await control.start()
        resources.push_async_callback(control.close)

    async def _serve_until_stopped(self) -> None:
        while True:
            pending = {await self._requests.get()}
            while not self._requests.empty():  # a burst of SIGHUPs is one reload
                pending.add(self._requests.get_nowait())
            if Request.STOP in pending:
                return
            await self.reload()

    async def reload(self) -> None:
        """SIGHUP: re-read the config, rediscover, and apply the new tree (unchanged resources keep
        their sockets and streams)."""
        try:
            cfg = self._reload_config() if self._reload_config else self.cfg
        except ConfigError as exc:
            log.error("reload: invalid configuration, keeping the running one", extra={"error": str(exc)})
            return
        new_backend = self.init_error is not None or needs_new_backend(self.cfg, cfg)
        before = self.served
        try:
            await self._load(cfg, new_backend=new_backend)
            self.init_error = None
            change = diff(before.tree, self.discovered)
            log.info("reloaded", extra={
                "resources": ",".join(self.manager.servers),
                "added": ",".join(change.added) or "-",
                "removed": ",".join(change.removed) or "-",
                "changed": ",".join(change.updated) or "-",
                "settings": ",".join(changed_settings(before.cfg, cfg)) or "-",
            })
        except DiscoveryError as exc:
            log.error("reload: discovery failed, keeping the running devices", extra={"error": str(exc)})
        except PluginError as exc:  # e.g. ConfigError: the backend factory rejects a --simulate profile
            log.error("reload: failed, keeping the running config and devices", extra={"error": str(exc)})
        self._settings_changed.set()
