"""`config-manager`: point the plugin's config file at the named config its node's label selects.

Run as the official chart runs it: an init container (ONESHOT=true) picks the config before the
plugin starts, and a sidecar follows the node and re-points the link, then signals the plugin
(SIGHUP), whose reload applies only what changed. Selection: core/nodeconfig.py; files:
app/configlink.py; signalling: app/procsignal.py; the API: kube/.

Where nvdp differs from the official config-manager (docs/configuration.md):
- ONESHOT reads the node itself (a GET) and applies its label before the plugin starts; the sidecar
  lists, then watches from the list's version: its first answer is the node as it is, so after the
  init container it finds nothing to change and sends no signal.
- One signal per real change: only when the link now resolves to another file.
- An unknown label value, an unreadable or invalid config: the current config stays, the problem
  is logged once, shown in the metrics and posted as an Event on the node; the sidecar keeps
  running (the official one exits 1). With no current config to keep (the init container), an
  unknown label starts the plugin on the default config instead.
- A new config is validated before the link moves, as the plugin loads it (config/load.py: the
  config-file schema, every flag's value, the MPS rules that need no GPU), so a config the plugin
  would refuse is never linked.
- The API server away: the current config stays; the watch resumes with back-off. ONESHOT waits
  `--api-wait` seconds, then starts the plugin on the default (the sidecar corrects it later).
- No process to signal: nothing to do (it reads the new link when it starts); not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from nvdp.app.configlink import available_configs, current_target, point, read_config, source_path
from nvdp.app.procsignal import Signalled, signal_process
from nvdp.config.manager import ManagerSettings
from nvdp.core.backoff import Backoff
from nvdp.core.nodeconfig import EMPTY, Chosen, NoChoice, Selection, Unknown, choose, choose_default
from nvdp.errors import ConfigError, KubeError, NodeConfigError
from nvdp.kube.client import KubeClient, NodeInfo
from nvdp.kube.connection import ClientConfig
from nvdp.kube.events import EVENT_NAMESPACE, node_event
from nvdp.kube.nodewatch import DEFAULT_BACKOFF, follow_node
from nvdp.ops.logs import LogOnce
from nvdp.ops.manager_state import ManagerState

log = logging.getLogger("nvdp.configmanager")

EVENT_COMPONENT = "nvdp-config-manager"


class ConfigManager:
    """Resource handling: owns nothing but the link it writes; the client is the caller's."""

    def __init__(self, settings: ManagerSettings, client: KubeClient, state: ManagerState | None = None,
                 proc_root: str = "/proc", backoff: Backoff = DEFAULT_BACKOFF, handler_wait_s: float = 10.0) -> None:
        self.settings = settings
        self.client = client
        self.state = state or ManagerState()
        self.proc_root = proc_root
        self.backoff = backoff
        self.handler_wait_s = handler_wait_s
        self.applied: list[str] = []  # every config the link was pointed at, in order (tests, demo)
        self.signalled: list[Signalled] = []
        self._node: NodeInfo | None = None
        self._once = LogOnce()

    async def run(self) -> None:
        if self.settings.oneshot:
            await self.run_once()
        else:
            await self.follow()

    async def run_once(self) -> None:
        """The init container: read the node (waiting up to --api-wait for the API), apply, return."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.api_wait_s
        failures = 0
        while True:
            try:
                node = await self.client.get_node(self.settings.node_name)
                break
            except KubeError as exc:
                failures += 1
                self._api_error(exc, failures)
                left = deadline - loop.time()
                if left <= 0:
                    log.warning("API server unavailable; starting on the current or default config",
                                extra={"waited_s": self.settings.api_wait_s})
                    await self.apply(None, reachable=False)
                    return
                await asyncio.sleep(min(self.backoff.delay(failures), left))
        self._api_ok()
        if node is None:
            log.warning("node not found; using the default config", extra={"node": self.settings.node_name})
        await self.apply(node)

    async def follow(self) -> None:
        """The sidecar: apply the node's label now and after every change, until cancelled."""
        async for seen in follow_node(self.client, self.settings.node_name, on_error=self._api_error,
                                      backoff=self.backoff, on_recovered=self._api_ok):
            self._api_ok()
            if seen.node is None and seen.via == "DELETED":
                log.warning("node deleted; falling back to the default config", extra={"node": self.settings.node_name})
            await self.apply(seen.node)

    # --- one decision -----------------------------------------------------------------------------

    async def apply(self, node: NodeInfo | None, reachable: bool = True) -> bool:
        """Select, validate and point the link; signal the plugin when it changed. True when it changed.
        Raises NodeConfigError/ConfigError only when there is no current config to keep."""
        s = self.settings
        if node is not None:
            self._node = node
        label = node.labels.get(s.node_label, "") if node is not None else ""
        self.state.label = label
        current = current_target(s.dst)  # NodeConfigError when the destination is not our link
        try:
            available = available_configs(s.srcdir)
            if reachable:
                selection: Selection = choose(label, available, s.default_config, s.fallbacks)
            elif current is not None:
                return False  # the API is away: keep what the pod was started with
            else:
                selection = choose_default(available, s.default_config, s.fallbacks)
            if isinstance(selection, Unknown):
                await self._report("unknown", "UnknownConfig", selection.describe() + (
                    "; keeping the current config" if current else "; starting on the default config"))
                self.state.unknown_label = label
                if current is not None:
                    self.state.source = "kept"
                    return False
                selection = choose_default(available, s.default_config, s.fallbacks)
            else:
                self.state.unknown_label = ""
                self._once.forget("unknown")
            if isinstance(selection, NoChoice):
                raise NodeConfigError(f"config folder {s.srcdir}: {selection.describe()}")
            changed = self._point(selection, current)
        except (NodeConfigError, ConfigError) as exc:
            if current is None:
                raise
            await self._report("problem", "InvalidConfig", f"{exc}; keeping the current config")
            self.state.problem = str(exc)
            return False
        self.state.problem = ""
        self._once.forget("problem")
        if changed:
            await self._signal()
        return changed

    def _point(self, chosen: Chosen, current: str | None) -> bool:
        s = self.settings
        src = source_path(s.srcdir, chosen.name)
        if current is not None and current == os.path.realpath(src):
            log.info("already configured", extra={"config": chosen.name or "(empty)", "source": chosen.why})
            self.state.config, self.state.source = chosen.name, chosen.why
            return False
        if chosen.name != EMPTY:
            # Imported here: pydantic and YAML only when a file is validated.
            from nvdp.config.load import load

            try:
                # As the chart's plugin gets it: CONFIG_FILE and nothing else (the plugin's own
                # flags and env are not ours to know). The MPS root is the plugin's to check.
                load({}, {"CONFIG_FILE": src}, read_config, require_mps_root=False)
            except ConfigError as exc:  # "invalid <key> in <file>: ...": add which config
                raise NodeConfigError(f"config {chosen.name!r} is not valid: {exc}") from exc
        changed = point(s.dst, src)
        self.state.config, self.state.source = chosen.name, chosen.why
        if changed:
            self.state.switches += 1
            self.applied.append(chosen.name)
            log.info("config applied", extra={"config": chosen.name or "(empty)", "source": chosen.why,
                                               "label": self.state.label or "-", "link": s.dst})
        return changed

    async def _signal(self) -> None:
        s = self.settings
        if not s.send_signal:
            return
        result = await signal_process(s.process_to_signal, s.signal, self.proc_root, self.handler_wait_s)
        self.signalled.append(result)
        if result is Signalled.NOT_RUNNING:
            self.state.signals_skipped += 1
            log.info("no process to signal; it reads the new config when it starts",
                     extra={"target": s.process_to_signal})
            return
        self.state.signals += 1
        level = logging.INFO if result is Signalled.SENT else logging.WARNING
        log.log(level, "signalled the plugin" if result is Signalled.SENT else
                "signalled the plugin before it had a handler for the signal",
                extra={"target": s.process_to_signal, "signal": s.signal})

    # --- reporting --------------------------------------------------------------------------------

    async def _report(self, key: str, reason: str, message: str) -> None:
        """Log once, and post one Event on the node, per distinct problem."""
        if not self._once.first(message, key):
            return
        log.error(message, extra={"node": self.settings.node_name, "reason": reason})
        if self._node is None:
            return
        body = node_event(self._node.name, self._node.uid, reason, message, EVENT_COMPONENT)
        try:
            await self.client.create_event(EVENT_NAMESPACE, body)
            self.state.events_posted += 1
        except KubeError as exc:
            if self._once.first(str(exc), "event"):
                log.warning("could not post an Event on the node", extra={"error": str(exc)})

    def _api_error(self, exc: KubeError, failures: int) -> None:
        self.state.api_up = False
        self.state.api_errors += 1
        if self._once.first(str(exc), "api"):
            log.warning("API server call failed; keeping the current config and retrying",
                        extra={"error": str(exc), "failures": failures})

    def _api_ok(self) -> None:
        if not self.state.api_up and self._once.last("api") is not None:
            log.info("API server reachable again")
        self.state.api_up = True
        self._once.forget("api")


async def run_config_manager(settings: ManagerSettings, config: ClientConfig, proc_root: str = "/proc",
                             handle_signals: bool = True) -> None:
    """The command: a client, the optional metrics listener, the manager; SIGTERM/SIGINT end it cleanly."""
    state = ManagerState()
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if handle_signals and task is not None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(KubeClient(config))
        if settings.metrics_address:
            from nvdp.ops.manager_metrics import ManagerListener

            await stack.enter_async_context(ManagerListener(state, settings.metrics_address))
        log.info("starting", extra={"node": settings.node_name, "label": settings.node_label,
                                    "oneshot": settings.oneshot, "api": client.source})
        manager = ConfigManager(settings, client, state, proc_root)
        with contextlib.suppress(asyncio.CancelledError):
            await manager.run()
