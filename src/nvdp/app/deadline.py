"""Blocking calls with a deadline: a wedged NVML must not stop health checking.

`DeadlineRunner.call` runs one blocking function on a worker thread and waits for it at most
`deadline_s`. When the deadline passes, the caller gets `CallTimedOut` at once; the worker is left
behind, still inside the call (a thread blocked in the driver cannot be stopped), and counted,
and the next call runs on a fresh worker. A late answer is dropped.

Each call names a `key` (a GPU, "events"...): while an abandoned call with that key has not
returned, a new call with the same key fails at once with `StillHung` instead of starting
another thread, so a GPU whose NVML calls never come back costs one thread, not one per probe.

Threads: workers are daemon threads (a thread stuck in the driver must not keep the process
from exiting); results come back with `loop.call_soon_threadsafe`. Calls are serialised: one
runs at a time, and its deadline starts when the worker takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger("nvdp.healthwatch")  # stable name: operators filter on it

T = TypeVar("T")


class CallTimedOut(Exception):
    """The call did not return within its deadline (its thread is left behind)."""

    def __init__(self, what: str, deadline_s: float, still_hung: bool = False) -> None:
        detail = (f"{what}: an earlier call has not returned yet" if still_hung
                  else f"{what} did not return within {deadline_s:g} s")
        super().__init__(detail)
        self.what = what
        self.deadline_s = deadline_s


class StillHung(CallTimedOut):
    """An earlier call with the same key is still stuck: this one was not started."""

    def __init__(self, what: str, deadline_s: float) -> None:
        super().__init__(what, deadline_s, still_hung=True)


@dataclass(eq=False)
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    key: Hashable = None


@dataclass(eq=False)
class _Worker:
    jobs: queue.SimpleQueue[_Job | None] = field(default_factory=queue.SimpleQueue)
    abandoned: bool = False
    thread: threading.Thread | None = None


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # timed out or cancelled meanwhile: nobody wants the answer
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DeadlineRunner:
    """See the module docstring. `on_hung(label)` is told about every call that passed its deadline
    (`label`: a short name of the kind of call, for metrics; `what` in messages says more)."""

    def __init__(self, name: str = "nvdp-nvml", on_hung: Callable[[str], None] | None = None) -> None:
        self._name = name
        self._on_hung = on_hung
        self._worker: _Worker | None = None
        self._lock: asyncio.Lock | None = None
        self._hung: dict[Hashable, _Worker] = {}  # key -> the worker stuck in that key's call
        self._hung_guard = threading.Lock()
        self.timed_out = 0  # calls that passed their deadline, in all

    @property
    def stuck_threads(self) -> int:
        """Workers still inside a call that passed its deadline."""
        with self._hung_guard:
            return len(self._hung)

    def stuck(self, key: Hashable) -> bool:
        with self._hung_guard:
            return key in self._hung

    async def call(
        self, label: str, what: str, key: Hashable, deadline_s: float, fn: Callable[..., T], *args: Any
    ) -> T:
        """`fn(*args)` on the worker; CallTimedOut after `deadline_s`, StillHung at once while an
        earlier call with this key is stuck. `fn`'s own exceptions propagate."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.stuck(key):
                raise StillHung(what, deadline_s)
            worker = self._current()
            loop = asyncio.get_running_loop()
            future: asyncio.Future[T] = loop.create_future()
            worker.jobs.put(_Job(fn, args, loop, future, key))
            try:
                async with asyncio.timeout(deadline_s):
                    return await asyncio.shield(future)
            except TimeoutError:
                self._abandon(worker, key, label, what)
                raise CallTimedOut(what, deadline_s) from None
            except asyncio.CancelledError:
                # Nobody waits any more: the answer is dropped, and the worker ends after this
                # call so that the next one does not queue behind it (not counted as stuck).
                future.cancel()
                worker.abandoned = True
                worker.jobs.put(None)
                self._worker = None
                raise

    def _current(self) -> _Worker:
        worker = self._worker
        if worker is None or worker.thread is None or not worker.thread.is_alive():
            worker = _Worker()
            worker.thread = threading.Thread(target=self._run, args=(worker,), name=self._name, daemon=True)
            worker.thread.start()
            self._worker = worker
        return worker

    def _abandon(self, worker: _Worker, key: Hashable, label: str, what: str) -> None:
        with self._hung_guard:
            worker.abandoned = True
            self._hung[key] = worker
        self._worker = None
        self.timed_out += 1
        log.error("NVML call past its deadline; its thread is left behind and health checks go on "
                  "on a fresh one", extra={"call": what, "stuck_threads": self.stuck_threads})
        if self._on_hung is not None:
            self._on_hung(label)

    def _run(self, worker: _Worker) -> None:
        while True:
            job = worker.jobs.get()
            if job is None:
                return
            result: Any = None
            error: BaseException | None = None
            try:
                result = job.fn(*job.args)
            except BaseException as exc:  # handed to the caller, who decides
                error = exc
            with self._hung_guard:
                abandoned = worker.abandoned
                was_stuck = self._hung.get(job.key) is worker
                if was_stuck:
                    del self._hung[job.key]
            if was_stuck:
                log.info("an NVML call that passed its deadline returned; its thread ends",
                         extra={"stuck_threads": self.stuck_threads})
            if abandoned:
                return
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)

    def close(self) -> None:
        """End the current worker once it is idle (stuck ones end when their call returns)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.jobs.put(None)
