"""GPU feature discovery's run loop (`gpu-feature-discovery`, `nvdp labels`), as upstream's:

1. open the backend the config names (NVML or the simulated node, the plugin's own
   `open_backend`); with --fail-on-init-error=false a backend that cannot start is replaced by
   one that has no GPUs (no GPU labels, no crash);
2. discover, compute the labels (`core.labels.node_labels`) and output them;
3. with --oneshot, stop; otherwise wait --sleep-interval (forever for `infinite`) and go to 2;
4. SIGHUP reloads everything (config, backend, output, timestamp); SIGTERM/SIGINT stop (exit 0);
5. on the way out in file mode (not oneshot, not infinite) the output file is removed, so NFD drops
   the labels of a node whose GFD is gone.

The timestamp label is taken when the loop (re)starts, as upstream, so a NodeFeature is not
rewritten every interval just because time passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TextIO

from nvdp.app import early_signals
from nvdp.app.discovery import BackendFactory, open_backend
from nvdp.app.labels_output import LabelOutput, NodeFeatureClient, open_output
from nvdp.backends.base import GpuBackend
from nvdp.config.options import GFD_OPTIONS, Config, format_duration
from nvdp.core.devices import Node
from nvdp.core.labels import node_labels
from nvdp.errors import ConfigError, DiscoveryError

log = logging.getLogger("nvdp.gfd")

NO_LABELS = "No labels generated from any source"


class Request(enum.Enum):
    RELOAD = "reload"
    STOP = "stop"


class NoGpus:
    """The backend that stands in when the real one cannot start and --fail-on-init-error=false
    (upstream's null manager): a node without GPUs."""

    name = "none"

    def discover(self) -> Node:
        return Node(gpus=())

    def close(self) -> None:
        """Nothing was opened."""


def read_machine_type(path: str) -> tuple[str | None, str]:
    """The machine-type file's text, or None and why when it cannot be read (the label is then
    `unknown`; an empty path means no file, as upstream)."""
    if not path:
        return None, ""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace"), ""
    except OSError as exc:
        return None, f"Error getting machine type from {path}: {exc.strerror or exc}"


ClientFactory = Callable[[Config], NodeFeatureClient | None]


class Labeller:
    """The running labeller.

    Resource handling: `run()` owns the backend (closed when it returns or reloads) and the output
    (the file removed on exit where upstream removes it).
    Error handling: a backend that cannot start raises its DiscoveryError when
    fail_on_init_error is set; a failing discovery or labelling run raises (DiscoveryError,
    LabelError), as upstream exits then; an output that cannot work (NodeFeature API without a
    client or node name) raises ConfigError before anything is discovered. A bad config on SIGHUP
    is logged and the running one kept, as the plugin does.
    """

    def __init__(
        self,
        cfg: Config,
        reload_config: Callable[[], Config] | None = None,
        backend_factory: BackendFactory = open_backend,
        client_factory: ClientFactory = lambda cfg: None,
        stdout: TextIO | None = None,  # None: sys.stdout when the labels are written
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self._reload_config = reload_config
        self._backend_factory = backend_factory
        self._client_factory = client_factory
        self._stdout = stdout
        self._clock = clock
        self._requests: asyncio.Queue[Request] = asyncio.Queue()
        self.runs = 0  # labelling runs done (tests wait on it)
        self.labels: Mapping[str, str] = {}  # the last labels output
        self._warned: frozenset[str] = frozenset()

    def stop(self) -> None:
        self._requests.put_nowait(Request.STOP)

    def request_reload(self) -> None:
        self._requests.put_nowait(Request.RELOAD)

    async def run(self, handle_signals: bool = False) -> None:
        log.info("Running with config: %s", self.cfg.to_json(GFD_OPTIONS))
        with contextlib.ExitStack() as cleanup:
            if handle_signals:
                self._handle_signals(cleanup)
            while await self._serve():
                assert self._reload_config is not None
                try:
                    self.cfg = self._reload_config()
                except ConfigError as exc:  # as the plugin: a bad edit does not stop the labelling
                    log.error("SIGHUP: keeping the running config, the new one is invalid: %s", exc)
                    continue
                log.info("reloaded on SIGHUP; running with config: %s", self.cfg.to_json(GFD_OPTIONS))

    def _handle_signals(self, cleanup: contextlib.ExitStack) -> None:
        loop = asyncio.get_running_loop()
        handlers = {signal.SIGTERM: self.stop, signal.SIGINT: self.stop, signal.SIGHUP: self.request_reload}
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler)
            cleanup.callback(loop.remove_signal_handler, sig)
        if early_signals.take_reload():  # a SIGHUP during start-up (app/early_signals.py)
            self.request_reload()

    def _open_backend(self) -> GpuBackend:
        try:
            return self._backend_factory(self.cfg)
        except DiscoveryError as exc:
            if self.cfg.fail_on_init_error:
                raise
            log.warning("no GPU labels: the GPUs cannot be discovered (%s); --fail-on-init-error=false, "
                        "so labelling goes on without them", exc)
            return NoGpus()

    async def _serve(self) -> bool:
        """Label until stopped (False) or asked to reload (True)."""
        cfg = self.cfg
        # The output before any discovery; the API client only in the NodeFeature API mode, and
        # only once the node and namespace are known (open_output names a missing one first).
        client = self._client_factory(cfg) if cfg.use_node_feature_api and cfg.node_name and cfg.namespace else None
        try:
            output = open_output(cfg, client, self._stdout or sys.stdout)
            backend = self._open_backend()
        except BaseException:
            if client is not None:
                client.close()
            raise
        timestamp = None if cfg.no_timestamp else int(self._clock())
        try:
            while True:
                self._label_once(backend, output, timestamp)
                if cfg.oneshot:
                    return False
                request = await self._next_request(cfg.sleep_interval)
                if request is Request.STOP:
                    self._remove_on_exit(cfg, output)
                    return False
                if request is Request.RELOAD:
                    if self._reload_config is None:
                        log.warning("SIGHUP: no way to reload the config here; labelling again")
                        continue
                    return True
        except BaseException:
            self._remove_on_exit(cfg, output)
            raise
        finally:
            backend.close()
            if client is not None:
                client.close()

    def _label_once(self, backend: GpuBackend, output: LabelOutput, timestamp: int | None) -> None:
        node = backend.discover()
        machine_type, unreadable = read_machine_type(self.cfg.machine_type_file)
        result = node_labels(node, self.cfg, machine_type, timestamp)
        new_warnings = frozenset(result.warnings) | ({unreadable} if unreadable else set())
        for warning in sorted(new_warnings - self._warned):  # once while it stays the same
            log.warning("%s", warning)
        self._warned = new_warnings
        if len(result.labels) <= 1:
            log.warning(NO_LABELS)
        output.write(result.labels)
        self.labels = result.labels
        self.runs += 1

    async def _next_request(self, interval: float) -> Request | None:
        """The next request, or None when `interval` seconds pass without one (a burst of SIGHUPs
        is one reload; a stop wins over a reload)."""
        if not math.isinf(interval):
            log.info("Sleeping for %s", format_duration(interval))
        try:
            first = await asyncio.wait_for(self._requests.get(), None if math.isinf(interval) else interval)
        except TimeoutError:
            return None
        pending = {first}
        while not self._requests.empty():
            pending.add(self._requests.get_nowait())
        return Request.STOP if Request.STOP in pending else Request.RELOAD

    @staticmethod
    def _remove_on_exit(cfg: Config, output: LabelOutput) -> None:
        # As upstream: only a repeating labeller takes its file back; a oneshot run (a Job, or a
        # manual check) and an `infinite` one leave the labels for NFD to keep.
        if not cfg.oneshot and not math.isinf(cfg.sleep_interval):
            output.remove()
