"""Runs the health checks: one thread waits on the backend's event source and posts into the
event loop; the loop folds events and probe results into the `HealthState` (policy in
`health.py`) and asks the plugin to publish a new tree.

Threads: the event wait blocks in the driver, so it gets its own daemon thread (`EventPump`),
which only ever calls `loop.call_soon_threadsafe`. Probes run with `asyncio.to_thread`.
Everything else happens on the loop, so the state needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from nvdp.backends.base import EventWaiter, HealthSource
from nvdp.core.backoff import Backoff
from nvdp.core.devices import Node
from nvdp.core.health import (
    EventKind,
    Fault,
    FaultSource,
    HealthEvent,
    HealthSettings,
    HealthState,
    Scope,
    Severity,
    add_fault,
    apply_event,
    apply_probe,
    apply_wait_result,
    drop_faults,
    forget_gpus,
    recovery_times,
)
from nvdp.errors import EventWaitError
from nvdp.ops.repeated_log import RepeatedLog

log = logging.getLogger("nvdp.healthwatch")  # stable name: operators filter on it


@dataclass(frozen=True)
class PumpTuning:
    """How the event thread waits: the wait timeout bounds how long stopping takes with a source
    that cannot be interrupted (NVML); failures back off exponentially up to `backoff_max_s`."""

    wait_timeout_s: float = 1.0
    backoff_first_s: float = 0.1
    backoff_max_s: float = 5.0
    join_timeout_s: float = 5.0

    def delay(self, failures: int) -> float:
        return Backoff(self.backoff_first_s, self.backoff_max_s).delay(failures)


DEFAULT_TUNING = PumpTuning()


@dataclass(frozen=True)
class WaitOutcome:
    """Posted by the pump after a failed wait (`failures` in a row) or the first good one after
    failures (`failures` = 0)."""

    failures: int
    error: str = ""


Posted = HealthEvent | WaitOutcome


class EventPump:
    """The body of the event thread: wait, post, back off on failures; until `stop()`."""

    def __init__(
        self,
        waiter: EventWaiter,
        post: Callable[[Posted], None],
        tuning: PumpTuning = DEFAULT_TUNING,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self._waiter = waiter
        self._post = post
        self._tuning = tuning
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait  # a back-off that stop() cuts short
        self.waits = 0

    def stop(self) -> None:
        self._stopping.set()
        self._waiter.interrupt()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self.waits += 1
            try:
                event = self._waiter.wait(self._tuning.wait_timeout_s)
            except Exception as exc:
                if not isinstance(exc, EventWaitError):
                    # A bug must not silently end health checking: count it as a failed wait.
                    log.exception("unexpected error in the health event thread")
                failures += 1
                self._post(WaitOutcome(failures, str(exc)))
                self._sleep(self._tuning.delay(failures))
                continue
            if failures:
                failures = 0
                self._post(WaitOutcome(0))
            if event is not None:
                self._post(event)


def _log_fields(device: str, reason: str, xid: int | None, **more: object) -> dict[str, object]:
    return {"device": device, "reason": reason, "xid": "-" if xid is None else xid, **more}


class HealthMonitor:
    """Owns the health state across reloads; `watch()` runs the checks for one backend and node.

    `publish` is called (on the loop) after every state change; the plugin overlays the state on
    the discovered tree and applies it. `clock` is injectable for tests.
    """

    def __init__(
        self,
        settings: HealthSettings,
        publish: Callable[[], Awaitable[None]],
        tuning: PumpTuning = DEFAULT_TUNING,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[HealthEvent], None] | None = None,
    ) -> None:
        """`on_event` sees every event for a served GPU, acted on or not (metrics count them)."""
        self.settings = settings
        self.state = HealthState()
        self._publish = publish
        self._tuning = tuning
        self._clock = clock
        self._wake = asyncio.Event()
        self._last_probe = float("-inf")
        self.events_received = 0
        self._on_event = on_event
        self.probes_run = 0
        # An XID storm the policy ignores (e.g. XID 13 from a buggy app) would be a line per event:
        # one line per kind and XID a minute, then the count (the metric counts every event).
        self._ignored = RepeatedLog(log, logging.INFO, "health event ignored by policy",
                                    "health events ignored by policy (repeats)")

    async def watch(self, source: HealthSource, node: Node) -> None:
        """Run the event thread and the probe/recovery timer until cancelled."""
        gpus = [g.uuid for g in node.gpus]
        self.state = forget_gpus(self.state, gpus)
        # A new event source: registration and wait failures belong to the old one.
        self.state = drop_faults(self.state, lambda f: f.source not in (FaultSource.REGISTER, FaultSource.WAIT))
        if not self.settings.enabled:
            log.info("health checks disabled (DP_DISABLE_HEALTHCHECKS=all)")
            await self._publish()
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Posted] = asyncio.Queue()
        pump: EventPump | None = None
        thread: threading.Thread | None = None
        waiter: EventWaiter | None = None
        try:
            if self.settings.switches.events:
                waiter = await asyncio.to_thread(source.watch_events, node)
                self._note_registration_failures(waiter)
                pump = EventPump(waiter, _poster(loop, queue), self._tuning)
                thread = threading.Thread(target=pump.run, name="nvdp-health-events", daemon=True)
                thread.start()
            await self._publish()
            async with asyncio.TaskGroup() as tasks:
                if pump is not None:
                    tasks.create_task(self._consume(queue, set(gpus)))
                tasks.create_task(self._timers(source, gpus))
        finally:
            self._ignored.flush(everything=True)
            if pump is not None and thread is not None and waiter is not None:
                pump.stop()
                await asyncio.to_thread(thread.join, self._tuning.join_timeout_s)
                if thread.is_alive():
                    log.warning("the health event thread did not stop in time; leaving its event set open")
                else:
                    waiter.close()

    def _note_registration_failures(self, waiter: EventWaiter) -> None:
        now = self._clock()
        for gpu, why in waiter.failures.items():
            reason = f"NVML event registration failed: {why}"
            fault = Fault(Scope(gpu), FaultSource.REGISTER, Severity.CONDITION, reason, None, now)
            self.state = add_fault(self.state, fault)

    # --- events (from the thread) ------------------------------------------------------------

    async def _consume(self, queue: asyncio.Queue[Posted], known: set[str]) -> None:
        while True:
            batch = [await queue.get()]
            while not queue.empty():  # a burst becomes one publish
                batch.append(queue.get_nowait())
            before = self.state
            for item in batch:
                self._apply(item, known)
            if self.state is not before:
                self._wake.set()  # the earliest recovery may have moved
                await self._publish()

    def _apply(self, item: Posted, known: set[str]) -> None:
        now = self._clock()
        if isinstance(item, WaitOutcome):
            self._apply_wait(item, now)
            return
        self.events_received += 1
        if item.gpu not in known:
            log.warning("health event for a GPU this plugin does not serve; ignored",
                        extra=_log_fields(item.gpu or "?", item.kind.value, item.xid))
            return
        if self._on_event is not None:
            self._on_event(item)
        new = apply_event(self.state, item, self.settings.switches.xids, now)
        if new is self.state:
            fields = _log_fields(item.gpu, item.kind.value, item.xid)
            if item.kind is EventKind.ECC_CORRECTED:  # routine on any GPU: debug only
                log.debug("health event ignored by policy", extra=fields)
            else:
                self._ignored.note((item.kind, item.xid), fields,
                                   {"reason": item.kind.value, "xid": fields["xid"]})
        self.state = new

    def _apply_wait(self, outcome: WaitOutcome, now: float) -> None:
        threshold = self.settings.wait_error_threshold
        if outcome.failures == 1:
            log.warning("NVML event wait failed; retrying with back-off",
                        extra={"error": outcome.error, "threshold": threshold})
        elif outcome.failures == threshold:
            log.error("NVML event wait keeps failing; marking every device unhealthy",
                      extra={"error": outcome.error, "failures": outcome.failures})
        elif outcome.failures == 0:
            log.info("NVML event wait works again")
        new = apply_wait_result(self.state, outcome.failures, outcome.error, threshold, now)
        if new != self.state:
            self.state = new

    # --- probes and recoveries ----------------------------------------------------------------

    def _next_deadline(self, next_probe: float) -> float:
        """The next periodic probe, or the earliest transient fault that is due for a recovery
        probe and has not had one since it became due."""
        quiet = self.settings.quiet_period_s
        due = recovery_times(self.state, quiet)
        fresh = [t for t in due if t > self._last_probe]
        deadline = min([next_probe, *fresh])
        if len(fresh) < len(due) and not self.settings.periodic_probes:
            # A recovery probe already failed and no periodic probe will come: retry later.
            deadline = min(deadline, self._last_probe + max(quiet, 1.0))
        return deadline

    async def _timers(self, source: HealthSource, gpus: Sequence[str]) -> None:
        interval = self.settings.probe_interval_s
        next_probe = self._clock() if self.settings.periodic_probes else float("inf")
        while True:
            self._wake.clear()
            deadline = self._next_deadline(next_probe)
            now = self._clock()
            if deadline > now:
                timeout = None if deadline == float("inf") else deadline - now
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                continue
            await self._probe(source, gpus)
            if self._last_probe >= next_probe:
                next_probe = self._last_probe + interval

    async def _probe(self, source: HealthSource, gpus: Sequence[str]) -> None:
        samples = await asyncio.to_thread(source.probe, gpus)
        now = self._clock()
        self._last_probe = now
        self.probes_run += 1
        before = self.state
        self.state = apply_probe(before, samples, self.settings.quiet_period_s, now)
        for gpu in gpus:
            cleared = [
                f for f in before.for_gpu(gpu) if f.severity is Severity.FATAL and f.key not in self.state.faults
            ]
            if cleared:
                log.info("GPU reset observed; its fatal faults are cleared",
                         extra=_log_fields(gpu, "; ".join(f.reason for f in cleared), cleared[0].xid))
        if self.state != before:
            await self._publish()


def _poster(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Posted]) -> Callable[[Posted], None]:
    def post(item: Posted) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, item)

    return post


class HealthTask:
    """Runs `HealthMonitor.watch` for one (backend, GPUs, settings) at a time, as a child of the
    plugin's TaskGroup: `ensure` restarts it only when that key changes, `stop` ends it.

    Error handling: an unexpected error in the checks is logged and propagates through the
    TaskGroup, which stops the plugin (health that silently stopped would be worse).
    """

    def __init__(self, monitor: HealthMonitor) -> None:
        self.monitor = monitor
        self._task: asyncio.Task[None] | None = None
        self._key: object = None

    async def ensure(
        self, tasks: asyncio.TaskGroup, source: HealthSource, node: Node, settings: HealthSettings, key: object
    ) -> None:
        if key == self._key and self._task is not None and not self._task.done():
            return
        await self.stop()
        self.monitor.settings = settings
        self._key = key
        self._task = tasks.create_task(self._watch(source, node), name="health")

    async def _watch(self, source: HealthSource, node: Node) -> None:
        try:
            await self.monitor.watch(source, node)
        except Exception as exc:
            log.error("health checking failed; stopping", extra={"error": repr(exc)})
            raise

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])  # unlike `await task`, never re-raises into the caller
