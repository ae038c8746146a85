"""DeadlineRunner: blocking calls with a deadline, threads left behind and counted, one per key."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from nvdp.app.deadline import CallTimedOut, DeadlineRunner, StillHung
from nvdp.testing import eventually


async def test_answers_and_errors_come_back() -> None:
    runner = DeadlineRunner()
    assert await runner.call("add", "adding", "k", 1.0, lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
        await runner.call("div", "dividing", "k", 1.0, lambda: 1 / 0)
    assert (runner.timed_out, runner.stuck_threads) == (0, 0)
    runner.close()


async def test_a_stuck_call_is_left_behind_and_the_next_runs_on_a_fresh_thread() -> None:
    timed_out: list[str] = []
    runner = DeadlineRunner(on_hung=timed_out.append)
    entered, release = threading.Event(), threading.Event()
    threads: list[threading.Thread] = []

    def stuck() -> str:
        threads.append(threading.current_thread())
        entered.set()
        release.wait()
        return "late"

    started = time.monotonic()
    with pytest.raises(CallTimedOut, match=r"probe of GPU-3 did not return within 0\.2 s"):
        await runner.call("probe", "probe of GPU-3", "GPU-3", 0.2, stuck)
    assert time.monotonic() - started < 5  # the deadline, not the call, decided
    assert entered.is_set() and timed_out == ["probe"]
    assert (runner.timed_out, runner.stuck_threads) == (1, 1)
    (stuck_thread,) = threads

    # Other keys go on, on another thread.
    assert await runner.call("probe", "probe of GPU-4", "GPU-4", 1.0, threading.current_thread) is not stuck_thread
    # The stuck key costs no second thread: it fails at once.
    with pytest.raises(StillHung, match="an earlier call has not returned yet"):
        await runner.call("probe", "probe of GPU-3", "GPU-3", 0.2, stuck)

    release.set()  # the driver answers at last: the late answer is dropped, the thread ends
    await eventually(lambda: runner.stuck_threads == 0, "the stuck thread to end")
    await eventually(lambda: not stuck_thread.is_alive(), "the thread left behind to exit")
    assert await runner.call("probe", "probe of GPU-3", "GPU-3", 1.0, lambda: "fresh") == "fresh"
    runner.close()


async def test_stuck_threads_do_not_keep_the_process_alive() -> None:
    runner = DeadlineRunner()
    release = threading.Event()
    with pytest.raises(CallTimedOut):
        await runner.call("probe", "probe", "k", 0.05, release.wait)
    stuck = [t for t in threading.enumerate() if t.name == "nvdp-nvml" and t.is_alive()]
    assert stuck and all(t.daemon for t in stuck)
    release.set()


async def test_a_cancelled_call_does_not_hold_up_the_next() -> None:
    runner = DeadlineRunner()
    entered, release = threading.Event(), threading.Event()

    def slow() -> None:
        entered.set()
        release.wait()

    call = asyncio.create_task(runner.call("probe", "probe", "a", 10.0, slow))
    await eventually(entered.is_set, "the call to start on its worker")
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call
    # The next call runs at once on a fresh worker, and nothing is counted as stuck.
    assert await runner.call("probe", "probe", "b", 1.0, lambda: "next") == "next"
    assert (runner.timed_out, runner.stuck_threads) == (0, 0)
    release.set()
    runner.close()
