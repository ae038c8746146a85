"""The shipped wait helpers: they return as soon as the condition holds and fail naming what was awaited."""

from __future__ import annotations

import asyncio
import time

import pytest

from nvdp.testing.waiting import MAX_STAYS_S, eventually, eventually_sync, stays_true


async def test_eventually_returns_once_the_predicate_holds() -> None:
    calls = 0

    def third_time() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 3

    await eventually(third_time, "the third call", poll_s=0)
    assert calls == 3


async def test_eventually_awaits_an_async_predicate() -> None:
    seen: list[int] = []

    async def grows() -> bool:
        await asyncio.sleep(0)
        seen.append(1)
        return len(seen) == 2

    await eventually(grows, "two calls", poll_s=0)
    assert seen == [1, 1]


async def test_eventually_fails_naming_what_it_waited_for() -> None:
    # The timeout itself is what is tested here, so it is short.
    with pytest.raises(AssertionError, match=r"timed out after 0.05 s waiting for the moon"):
        await eventually(lambda: False, "the moon", timeout_s=0.05)


async def test_a_timeout_raised_by_the_predicate_is_not_reported_as_ours() -> None:
    def broken() -> bool:
        raise TimeoutError("the predicate's own")

    with pytest.raises(TimeoutError, match="the predicate's own"):
        await eventually(broken, "anything")


def test_eventually_sync_polls_and_adds_the_detail_on_failure() -> None:
    until = time.monotonic() + 0.02
    eventually_sync(lambda: time.monotonic() >= until, "20 ms to pass")
    with pytest.raises(AssertionError, match=r"waiting for a file\nthe log says why"):
        eventually_sync(lambda: False, "a file", timeout_s=0.02, detail=lambda: "the log says why")


async def test_stays_true_checks_through_the_window() -> None:
    calls = 0

    def counted() -> bool:
        nonlocal calls
        calls += 1
        return True

    await stays_true(counted, 0.05, "always true")
    assert calls >= 3  # not just once at each end


async def test_stays_true_fails_at_the_first_false() -> None:
    calls = 0

    def true_twice() -> bool:
        nonlocal calls
        calls += 1
        return calls <= 2

    with pytest.raises(AssertionError, match=r"^the flag: stopped holding after"):
        await stays_true(true_twice, MAX_STAYS_S, "the flag")
    assert calls == 3  # it stopped at the first false instead of sitting out the window


@pytest.mark.parametrize("for_s", [0.0, -1.0, MAX_STAYS_S + 0.1])
async def test_stays_true_is_bounded(for_s: float) -> None:
    with pytest.raises(ValueError, match="for_s must be in"):
        await stays_true(lambda: True, for_s, "anything")
