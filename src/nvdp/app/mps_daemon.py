"""`mps-control-daemon`: starts and supervises one MPS control daemon per MPS-shared resource.

What the official image's `mps-control-daemon` does, per resource of the same config the plugin
reads (same discovery, same tree): every GPU's compute mode set to EXCLUSIVE_PROCESS
(`nvidia-smi -i <uuid> -c EXCLUSIVE_PROCESS`), `<root>/<resource>/pipe` and `.../log` created,
`nvidia-cuda-mps-control -d` started, each GPU's pinned-memory limit and the active-thread
percentage set (core/mps.py), `<root>/<resource>/.started` written; `<root>/.ready` once all are
up. Stop: `quit` to each daemon, compute modes back to DEFAULT, `.started` and the log folder
removed. SIGHUP restarts everything with the config read again; a failed start is retried with
back-off (from 1 s; the official daemon waits 30 s).

Unlike the official daemon, which only tails the daemons' logs, this one supervises them: every
few seconds it asks each daemon what the plugin asks, and a daemon that does not answer is
started again (the plugin holds its resource back meanwhile). Each daemon's control.log is
forwarded to this process's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nvdp.app import early_signals
from nvdp.app.discovery import BackendFactory, discover_once, open_backend
from nvdp.backends.mps import ComputeMode, MpsControl, is_mounted, mount_tmpfs
from nvdp.config.options import Config
from nvdp.core import mps
from nvdp.core.backoff import Backoff
from nvdp.core.mps import MpsDaemon
from nvdp.errors import MpsError

log = logging.getLogger("nvdp.mpsdaemon")  # new with MPS support

EXCLUSIVE = "EXCLUSIVE_PROCESS"
DEFAULT_MODE = "DEFAULT"


@dataclass(frozen=True)
class DaemonTiming:
    first_s: float = 1.0  # back-off after a failed start, doubling...
    max_s: float = 30.0  # ...up to the official daemon's fixed 30 s
    check_s: float = 5.0  # how often every daemon is asked whether it answers
    timeout_s: float = 10.0  # one program call's limit


class Request(enum.Enum):
    RESTART = "restart"
    STOP = "stop"


class LogTail:
    """The lines appended to a file since the last call (a file that shrank is read from the start)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, 2)
                if f.tell() < self.offset:
                    self.offset = 0
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        complete = data.rpartition(b"\n")[0]
        if not complete:
            return []
        self.offset += len(complete) + 1
        return complete.decode(errors="replace").splitlines()


class ControlDaemon:
    """Resource handling: every daemon this started is stopped (and its GPUs' compute mode
    restored) when `run()` returns, however it returns. Error handling: a program that fails at
    start is retried with back-off; a ConfigError or DiscoveryError (the config does not fit the
    node) propagates, for the CLI to turn into an exit status."""

    def __init__(
        self,
        cfg: Config,
        backend_factory: BackendFactory = open_backend,
        reload_config: Callable[[], Config] | None = None,
        timing: DaemonTiming | None = None,
    ) -> None:
        self.cfg = cfg
        self._backend_factory = backend_factory
        self._reload_config = reload_config
        self.timing = timing or DaemonTiming()
        self.running: dict[str, MpsDaemon] = {}  # resource -> its daemon, while started
        self.restarts = 0  # daemons started again after they stopped answering
        self.start_failures = 0
        self.ready = asyncio.Event()  # set while every daemon is started
        self._requests: asyncio.Queue[Request] = asyncio.Queue()
        self._tails: dict[str, LogTail] = {}

    @property
    def root(self) -> Path:
        return Path(self.cfg.mps_dir)

    def stop(self) -> None:
        self._requests.put_nowait(Request.STOP)

    def request_restart(self) -> None:
        self._requests.put_nowait(Request.RESTART)

    async def run(self, handle_signals: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig, handler in ((signal.SIGTERM, self.stop), (signal.SIGINT, self.stop),
                                 (signal.SIGHUP, self.request_restart)):
                loop.add_signal_handler(sig, handler)
            if early_signals.take_reload():  # a SIGHUP during start-up (app/early_signals.py)
                self.request_restart()
        try:
            while True:
                daemons = await asyncio.to_thread(self._plan)
                request = await self._serve(daemons)
                if request is Request.STOP:
                    return
                log.info("SIGHUP: restarting the MPS control daemons")
                if self._reload_config is not None:
                    self.cfg = self._reload_config()
        finally:
            await self._stop_all()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            log.info("stopped")

    def _plan(self) -> tuple[MpsDaemon, ...]:
        _, planned = discover_once(self.cfg, self._backend_factory)
        return planned.mps

    async def _serve(self, daemons: Sequence[MpsDaemon]) -> Request:
        """Start every daemon (retrying), then supervise them until a request comes."""
        if not daemons:
            log.warning("no resource is shared with MPS in the config (sharing.mps); nothing to start, "
                        "waiting for SIGHUP")
            return await self._requests.get()
        backoff = Backoff(self.timing.first_s, self.timing.max_s)
        failures = 0
        while True:
            try:
                await self._start_all(daemons)
                break
            except MpsError as exc:
                failures += 1
                self.start_failures += 1
                delay = backoff.delay(failures)
                log.error("MPS control daemons failed to start; stopping those started and retrying",
                          extra={"error": str(exc), "retry_s": delay})
                await self._stop_all()
                request = await self._next_request(delay)
                if request is not None:
                    return request
        while True:
            request = await self._next_request(self.timing.check_s)
            if request is not None:
                await self._stop_all()
                return request
            await self._supervise()

    async def _next_request(self, timeout: float) -> Request | None:
        try:
            async with asyncio.timeout(timeout):
                return await self._requests.get()
        except TimeoutError:
            return None

    def _control(self) -> MpsControl:
        return MpsControl(self.cfg.mps_control, str(self.root), self.timing.timeout_s)

    def _compute_mode(self) -> ComputeMode:
        return ComputeMode(self.cfg.nvidia_smi, self.timing.timeout_s)

    async def _start_all(self, daemons: Sequence[MpsDaemon]) -> None:
        (self.root / mps.READY_FILE).unlink(missing_ok=True)
        for daemon in daemons:
            await self._start(daemon)
        (self.root / mps.READY_FILE).touch()
        self.ready.set()
        log.info("every MPS control daemon is started", extra={"resources": ",".join(self.running)})

    async def _start(self, daemon: MpsDaemon) -> None:
        control, modes = self._control(), self._compute_mode()
        self.running[daemon.resource] = daemon  # from the first step on: stop undoes what was done
        for gpu in daemon.gpus:
            await modes.set(gpu.uuid, EXCLUSIVE)
        await self._launch(control, daemon)
        log.info("MPS control daemon started",
                 extra={"resource": daemon.resource, "replicas": daemon.replicas,
                        "gpus": ",".join(g.index for g in daemon.gpus),
                        "thread_percentage": daemon.thread_percentage})

    async def _launch(self, control: MpsControl, daemon: MpsDaemon) -> None:
        pipe = Path(mps.pipe_dir(str(self.root), daemon.resource))
        logs = Path(mps.log_dir(str(self.root), daemon.resource))
        pipe.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        self._tails.setdefault(daemon.resource, LogTail(logs / "control.log"))
        await control.start_daemon(daemon.resource)
        await control.ask(daemon.resource, daemon.settings())
        (pipe.parent / mps.STARTED_FILE).touch()

    async def _supervise(self) -> None:
        control = self._control()
        for name, daemon in list(self.running.items()):
            self._forward_log(name)
            why = await control.probe(name)
            if why is None:
                continue
            self.ready.clear()
            (Path(mps.pipe_dir(str(self.root), name)).parent / mps.STARTED_FILE).unlink(missing_ok=True)
            log.warning("MPS control daemon does not answer; starting it again",
                        extra={"resource": name, "reason": why})
            try:
                await self._launch(control, daemon)
            except MpsError as exc:  # tried again on the next check
                log.error("MPS control daemon did not start again", extra={"resource": name, "error": str(exc)})
                continue
            self.restarts += 1
            log.info("MPS control daemon started again", extra={"resource": name})
        if all((Path(mps.pipe_dir(str(self.root), n)).parent / mps.STARTED_FILE).exists() for n in self.running):
            self.ready.set()

    def _forward_log(self, resource: str) -> None:
        tail = self._tails.get(resource)
        for line in tail.new_lines() if tail is not None else ():
            log.info("control.log: %s", line, extra={"resource": resource})

    async def _stop_all(self) -> None:
        self.ready.clear()
        (self.root / mps.READY_FILE).unlink(missing_ok=True)
        for name in list(self.running):
            await self._stop(self.running.pop(name))

    async def _stop(self, daemon: MpsDaemon) -> None:
        control, modes = self._control(), self._compute_mode()
        self._forward_log(daemon.resource)
        try:
            await control.ask(daemon.resource, [mps.QUIT_COMMAND])
        except MpsError as exc:  # not running (it died, or never started)
            log.info("MPS control daemon was not running at stop", extra={"resource": daemon.resource,
                                                                         "error": str(exc)})
        for gpu in daemon.gpus:
            try:
                await modes.set(gpu.uuid, DEFAULT_MODE)
            except MpsError as exc:
                log.error("could not restore the compute mode", extra={"gpu": gpu.uuid, "error": str(exc)})
        base = Path(mps.pipe_dir(str(self.root), daemon.resource)).parent
        (base / mps.STARTED_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            shutil.rmtree(mps.log_dir(str(self.root), daemon.resource))
        self._tails.pop(daemon.resource, None)
        log.info("MPS control daemon stopped", extra={"resource": daemon.resource})


def mount_shm(root: str, mount_command: str, meminfo: str, mountinfo: str) -> str:
    """`mps-control-daemon mount-shm`: a tmpfs of half the node's memory at <root>/shm, which
    every MPS client gets as /dev/shm. Returns what was done, for the log."""
    target = Path(root) / mps.SHM_DIR
    target.mkdir(parents=True, exist_ok=True)
    if is_mounted(str(target), mountinfo):
        return f"{target} is already mounted"
    size = mps.shm_size(meminfo)
    mount_tmpfs(mount_command, str(target), size)
    return f"mounted a tmpfs of {size} at {target}"
