"""The event thread's loop, run synchronously with a scripted waiter and a recording sleep."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from nvdp.app.health_monitor import EventPump, Posted, PumpTuning, WaitOutcome
from nvdp.core.health import EventKind, HealthEvent
from nvdp.errors import EventWaitError

XID = HealthEvent("GPU-0", EventKind.XID, xid=79)


class ScriptedWaiter:
    """Returns/raises the script's items in order, then stops the pump."""

    def __init__(self, script: list[HealthEvent | Exception | None]) -> None:
        self.script = list(script)
        self.pump: EventPump | None = None
        self.failures: Mapping[str, str] = {}
        self.interrupted = 0

    def wait(self, timeout_s: float) -> HealthEvent | None:
        assert timeout_s == 1.0
        if not self.script:
            assert self.pump is not None
            self.pump.stop()
            return None
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def interrupt(self) -> None:
        self.interrupted += 1

    def close(self) -> None:
        pass


def run(script: list[HealthEvent | Exception | None]) -> tuple[list[Posted], list[float]]:
    posted: list[Posted] = []
    slept: list[float] = []
    waiter = ScriptedWaiter(script)
    pump = EventPump(waiter, posted.append, PumpTuning(), sleep=slept.append)
    waiter.pump = pump
    pump.run()
    assert waiter.interrupted == 1
    return posted, slept


def test_events_are_posted_and_timeouts_are_not() -> None:
    posted, slept = run([None, XID, None, XID])
    assert posted == [XID, XID]
    assert slept == []


def test_failures_back_off_exponentially_up_to_the_cap_then_recover() -> None:
    failure = EventWaitError("nvmlEventSetWait: Unknown Error")
    posted, slept = run([failure] * 8 + [None, XID])
    assert slept == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert posted == [*(WaitOutcome(n, str(failure)) for n in range(1, 9)), WaitOutcome(0), XID]


def test_an_unexpected_error_counts_as_a_failed_wait(caplog: pytest.LogCaptureFixture) -> None:
    posted, slept = run([RuntimeError("bug"), XID])
    assert posted == [WaitOutcome(1, "bug"), WaitOutcome(0), XID]
    assert slept == [0.1]
    assert "unexpected error in the health event thread" in caplog.text


def test_stop_cuts_a_back_off_short() -> None:
    import threading
    import time

    class AlwaysFails(ScriptedWaiter):
        def wait(self, timeout_s: float) -> HealthEvent | None:
            raise EventWaitError("down")

    failed = threading.Event()
    pump = EventPump(AlwaysFails([]), lambda item: failed.set(), PumpTuning(backoff_first_s=30, backoff_max_s=30))
    thread = threading.Thread(target=pump.run)
    thread.start()
    assert failed.wait(5)  # the failure is posted just before the 30 s back-off starts
    started = time.monotonic()
    pump.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 1
    assert pump.waits == 1
