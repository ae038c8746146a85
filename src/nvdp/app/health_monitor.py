"""Runs the health checks: one thread waits on the backend's event source and posts into the
event loop; the loop folds events and probe results into the `HealthState` (policy in
`health.py`) and asks the plugin to publish a new tree.

Threads: the event wait blocks in the driver, so it gets its own daemon thread (`EventPump`),
which only ever calls `loop.call_soon_threadsafe`. Every other NVML call on the health path
(subscribing to events, the probe of each GPU, the hygiene check) runs through a
`DeadlineRunner`, and a watchdog checks that the event thread's wait comes back: a call past its
deadline marks its GPU (or, for the event wait and the subscription, every GPU) Unhealthy with
reason `nvml-timeout`, its thread is left behind and counted, and health checking goes on on a
fresh thread. Everything else happens on the loop, so the state needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from nvdp.app.deadline import CallTimedOut, DeadlineRunner
from nvdp.backends.base import EventWaiter, HealthSource, UsageSource
from nvdp.core.backoff import Backoff
from nvdp.core.devices import Node
from nvdp.core.health import (
    NVML_TIMEOUT,
    EventKind,
    Fault,
    FaultSource,
    HealthEvent,
    HealthSettings,
    HealthState,
    ProbeSample,
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
from nvdp.core.hygiene import dirty_reason
from nvdp.errors import DeviceError, EventWaitError
from nvdp.ops.repeated_log import RepeatedLog

T = TypeVar("T")

log = logging.getLogger("nvdp.healthwatch")  # stable name: operators filter on it


@dataclass(frozen=True)
class PumpTuning:
    """How the event thread waits: the wait timeout bounds how long stopping takes with a source
    that cannot be interrupted (NVML); failures back off exponentially up to `backoff_max_s`."""

    wait_timeout_s: float = 1.0
    backoff_first_s: float = 0.1
    backoff_max_s: float = 5.0
    join_timeout_s: float = 5.0
    watchdog_interval_s: float = 0.5  # how often the event thread is checked for a wait that never returns
    max_stuck_event_threads: int = 4  # event threads left behind in a wait before no new one is started

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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._waiter = waiter
        self._post_to_loop = post
        self._tuning = tuning
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait  # a back-off that stop() cuts short
        self._clock = clock
        self.waits = 0
        self.returned = 0  # waits that came back (an event, a timeout or an error)
        self.wait_started: float | None = None  # when the wait now under way started (None: not waiting)

    def stuck_for(self) -> float:
        """Seconds the wait now under way has taken (0 when not waiting)."""
        started = self.wait_started
        return 0.0 if started is None else self._clock() - started

    def _post(self, item: Posted) -> None:
        if not self._stopping.is_set():  # a thread left behind must not post late answers
            self._post_to_loop(item)

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
            self.wait_started = self._clock()
            try:
                event = self._waiter.wait(self._tuning.wait_timeout_s)
            except Exception as exc:
                self._returned()
                if not isinstance(exc, EventWaitError):
                    # A bug must not silently end health checking: count it as a failed wait.
                    log.exception("unexpected error in the health event thread")
                failures += 1
                self._post(WaitOutcome(failures, str(exc)))
                self._sleep(self._tuning.delay(failures))
                continue
            self._returned()
            if failures:
                failures = 0
                self._post(WaitOutcome(0))
            if event is not None:
                self._post(event)

    def _returned(self) -> None:
        self.wait_started = None
        self.returned += 1


@dataclass(eq=False)
class _EventThread:
    """One event subscription and the thread waiting on it."""

    pump: EventPump
    waiter: EventWaiter
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="nvdp-health-events", daemon=True)

    def _run(self) -> None:
        self.pump.run()
        self.waiter.close()  # on this thread, once its last wait is over (also for one left behind)


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
        on_timeout: Callable[[str], None] | None = None,
    ) -> None:
        """`on_event` sees every event for a served GPU, acted on or not (metrics count them);
        `on_timeout(call)` every NVML call that passed its deadline."""
        self.settings = settings
        self.state = HealthState()
        self._publish = publish
        self._tuning = tuning
        self._clock = clock
        self._wake = asyncio.Event()
        self._last_probe = float("-inf")
        self.events_received = 0
        self._on_event = on_event
        self._on_timeout = on_timeout
        self.probes_run = 0
        # An XID storm the policy ignores (e.g. XID 13 from a buggy app) would be a line per event:
        # one line per kind and XID a minute, then the count (the metric counts every event).
        self._ignored = RepeatedLog(log, logging.INFO, "health event ignored by policy",
                                    "health events ignored by policy (repeats)")
        self._calls = DeadlineRunner(on_hung=on_timeout)
        self._events: _EventThread | None = None
        self._left_behind: list[_EventThread] = []  # event threads abandoned in a wait
        self._resubscribe_at = 0.0
        self._subscribe_failures = 0
        self.event_threads_abandoned = 0

    @property
    def stuck_threads(self) -> int:
        """Threads still inside an NVML call that passed its deadline (probes, subscriptions,
        hygiene checks and event waits)."""
        return self._calls.stuck_threads + sum(t.thread.is_alive() for t in self._left_behind)

    async def guarded(self, label: str, what: str, source: object, gpu: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` under the NVML deadline, keyed by GPU (see `DeadlineRunner`); for callers
        outside the health checks (the hygiene check). Raises CallTimedOut."""
        return await self._calls.call(label, what, _key(source, gpu), self.settings.nvml_timeout_s, fn, *args)

    async def mark(self, gpu: str, source: FaultSource, reason: str) -> None:
        """A condition found outside the checks (a dirty GPU, a timed-out hygiene check); the
        probe clears it once the GPU passes again."""
        fault = Fault(Scope(gpu), source, Severity.CONDITION, reason, None, self._clock())
        current = self.state.faults.get(fault.key)
        if current is not None and current.reason == reason:
            return
        self.state = add_fault(self.state, fault)
        self._wake.set()
        await self._publish()

    async def watch(self, source: HealthSource, node: Node) -> None:
        """Run the event thread and the probe/recovery timer until cancelled."""
        gpus = [g.uuid for g in node.gpus]
        self.state = forget_gpus(self.state, gpus)
        # A new event source: registration, wait and event-timeout faults belong to the old one.
        self.state = drop_faults(self.state, lambda f: f.source not in (FaultSource.REGISTER, FaultSource.WAIT)
                                 and not (f.source is FaultSource.TIMEOUT and f.scope.gpu is None))
        if not self.settings.enabled:
            log.info("health checks disabled (DP_DISABLE_HEALTHCHECKS=all)")
            await self._publish()
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Posted] = asyncio.Queue()
        self._subscribe_failures = 0
        try:
            if self.settings.switches.events:
                await self._subscribe(source, node, loop, queue)
            await self._publish()
            async with asyncio.TaskGroup() as tasks:
                if self.settings.switches.events:
                    tasks.create_task(self._consume(queue, set(gpus)))
                    tasks.create_task(self._watch_event_thread(source, node, loop, queue))
                tasks.create_task(self._timers(source, gpus))
        finally:
            self._ignored.flush(everything=True)
            await self._unsubscribe()

    # --- the event thread: subscribe, watch its waits, replace it when stuck -----------------------

    async def _subscribe(
        self, source: HealthSource, node: Node, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Posted]
    ) -> bool:
        """Open the event subscription (under the deadline) and start its thread."""
        try:
            waiter = await self._calls.call("subscribe", "subscribing to NVML events", _key(source, "events"),
                                            self.settings.nvml_timeout_s, source.watch_events, node)
        except CallTimedOut as exc:
            self._subscribe_failures += 1
            delay = Backoff(self._tuning.backoff_first_s, self._tuning.backoff_max_s).delay(self._subscribe_failures)
            self._resubscribe_at = time.monotonic() + delay
            self._events_timed_out(str(exc))
            return False
        self._subscribe_failures = 0
        self._note_registration_failures(waiter)
        pump = EventPump(waiter, _poster(loop, queue), self._tuning)
        self._events = _EventThread(pump, waiter)
        self._events.thread.start()
        return True

    async def _unsubscribe(self) -> None:
        current, self._events = self._events, None
        if current is None:
            return
        current.pump.stop()
        await asyncio.to_thread(current.thread.join, self._tuning.join_timeout_s)
        if current.thread.is_alive():
            log.warning("the health event thread did not stop in time; it closes its event set when its wait ends")

    def _events_timed_out(self, detail: str) -> None:
        fault = Fault(Scope(None), FaultSource.TIMEOUT, Severity.CONDITION, f"{NVML_TIMEOUT}: {detail}", None,
                      self._clock())
        if fault.key not in self.state.faults:
            log.error("NVML event calls do not return; marking every device unhealthy", extra={"error": detail})
        self.state = add_fault(self.state, fault)

    async def _watch_event_thread(
        self, source: HealthSource, node: Node, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Posted]
    ) -> None:
        """The watchdog: a wait that takes longer than its timeout plus the NVML deadline is
        stuck in the driver. Its thread is left behind (and counted), every device is marked,
        and a fresh subscription is opened on a fresh thread; the first wait of that one that
        comes back clears the mark."""
        limit = self._tuning.wait_timeout_s + self.settings.nvml_timeout_s
        while True:
            await asyncio.sleep(self._tuning.watchdog_interval_s)
            self._left_behind = [t for t in self._left_behind if t.thread.is_alive()]
            current = self._events
            if current is None:
                if time.monotonic() < self._resubscribe_at:
                    continue
                if len(self._left_behind) >= self._tuning.max_stuck_event_threads:
                    continue  # bounded: no new thread while this many are stuck (the devices stay marked)
                before = self.state
                await self._subscribe(source, node, loop, queue)
                if self.state is not before:
                    await self._publish()
                continue
            if current.pump.stuck_for() > limit:
                current.pump.stop()
                self._left_behind.append(current)
                self._events = None
                self.event_threads_abandoned += 1
                self._resubscribe_at = 0.0
                if self._on_timeout is not None:
                    self._on_timeout("event-wait")
                self._events_timed_out(f"nvmlEventSetWait did not return within {limit:g} s "
                                       f"(its {self._tuning.wait_timeout_s:g} s wait plus the NVML deadline)")
                await self._publish()
            elif current.pump.returned and EVENTS_TIMEOUT in self.state.faults:
                log.info("NVML event calls return again")
                self.state = drop_faults(self.state, lambda f: f.key != EVENTS_TIMEOUT)
                await self._publish()

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
        new = apply_event(self.state, item, self.settings.switches.xids, now, self.settings.table,
                          self.settings.use_recovery_action)
        if item.recovery_action is not None and self.settings.use_recovery_action and new is not self.state:
            log.info("the driver's recovery action decides the XID's class", extra=_log_fields(
                item.gpu, new.faults[_xid_key(item)].reason, item.xid, recovery_action=item.recovery_action))
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
        due = recovery_times(self.state, quiet, self.settings.fatal_quiet_period_s)
        fresh = [t for t in due if t > self._last_probe]
        deadline = min([next_probe, *fresh])
        # Conditions a probe clears (a dirty GPU, a call past its deadline) need probes too.
        waiting = any(f.source in (FaultSource.DIRTY, FaultSource.TIMEOUT) for f in self.state.faults.values())
        if (len(fresh) < len(due) or waiting) and not self.settings.periodic_probes:
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
        """One probe round, one GPU at a time under the NVML deadline: a GPU whose probe does
        not come back is marked `nvml-timeout` and the others are probed on a fresh thread."""
        samples: dict[str, ProbeSample] = {}
        threshold = self.settings.hygiene_threshold_bytes
        dirty = {f.scope.gpu for f in self.state.faults.values() if f.source is FaultSource.DIRTY}
        for gpu in gpus:
            check_usage = threshold is not None and gpu in dirty and isinstance(source, UsageSource)
            try:
                samples[gpu] = await self._calls.call("probe", f"health probe of {gpu}", _key(source, gpu),
                                                      self.settings.nvml_timeout_s, _probe_one, source, gpu,
                                                      threshold if check_usage else None)
            except CallTimedOut as exc:
                samples[gpu] = ProbeSample(reachable=False, timed_out=True, error=str(exc))
        now = self._clock()
        self._last_probe = now
        self.probes_run += 1
        before = self.state
        self.state = apply_probe(before, samples, self.settings.quiet_period_s, now,
                                 self.settings.fatal_quiet_period_s, self.settings.use_recovery_action)
        for gpu in gpus:
            cleared = [
                f for f in before.for_gpu(gpu) if f.severity is Severity.FATAL and f.key not in self.state.faults
            ]
            if cleared:
                log.info("GPU reset observed; its fatal faults are cleared",
                         extra=_log_fields(gpu, "; ".join(f.reason for f in cleared), cleared[0].xid))
        if self.state != before:
            await self._publish()


def _key(source: object, what: str) -> Hashable:
    """A deadline key: per backend object, so a new backend's calls are not blocked by an old one's."""
    return (id(source), what)


def _xid_key(event: HealthEvent) -> tuple[Scope, FaultSource, int | None]:
    return (Scope(event.gpu, event.gi, event.ci if event.gi is not None else None), FaultSource.XID, event.xid)


# The key of the every-GPU `nvml-timeout` fault raised when the event calls do not return.
EVENTS_TIMEOUT = (Scope(None), FaultSource.TIMEOUT, None)


def _probe_one(source: HealthSource, gpu: str, hygiene_threshold: int | None) -> ProbeSample:
    """The probe of one GPU (on the deadline's worker thread); for a GPU marked dirty, also
    whether it is clean again."""
    sample = source.probe([gpu])[gpu]
    if hygiene_threshold is not None and sample.reachable and isinstance(source, UsageSource):
        try:
            sample = replace(sample, dirty=dirty_reason(source.usage(gpu), hygiene_threshold))
        except DeviceError as exc:  # not known now: the GPU stays as it is marked, the next probe asks again
            log.debug("GPU hygiene: cannot read what runs on the GPU", extra={"device": gpu, "error": str(exc)})
    return sample


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
