"""Waiting in tests without fixed sleeps.

- `eventually` (and `eventually_sync` for plain, non-async tests) waits for something that should
  happen: it returns the moment the predicate holds, so a fast machine stays fast and a slow one
  gets slower, not red. The timeout is only reached when something is broken, and the failure
  says what was awaited.
- `stays_true` is for the rare test that must show something does NOT happen. There is nothing to
  wait for then but the clock, so it is the one place a test may pause for a fixed time: named,
  capped at `MAX_STAYS_S`, and checking the predicate all through the window (it fails at the first
  moment the predicate is false, not only at the end).

A state that an asyncio.Condition announces is better awaited on that Condition (the fake kubelet's
`wait_for` and `wait_registered`); these helpers poll, for state that nothing announces.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

WAIT_S = 30.0  # default bound for anything that should happen "soon"; only reached when broken
POLL_S = 0.01
MAX_STAYS_S = 2.0  # the longest fixed pause `stays_true` allows

Predicate = Callable[[], bool | Awaitable[bool]]  # a plain function or a coroutine function


async def _holds(predicate: Predicate) -> bool:
    result = predicate()
    if inspect.isawaitable(result):
        return bool(await result)
    return bool(result)


async def eventually(predicate: Predicate, what: str, timeout_s: float = WAIT_S, poll_s: float = POLL_S) -> None:
    """Poll `predicate` (sync or async) until it returns true; AssertionError naming `what` when
    `timeout_s` passes first. Exceptions raised by the predicate propagate as they are."""
    scope = asyncio.timeout(timeout_s)
    try:
        async with scope:
            while not await _holds(predicate):
                await asyncio.sleep(poll_s)
    except TimeoutError:
        if not scope.expired():
            raise  # the predicate's own TimeoutError, not ours
        raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}") from None


def eventually_sync(
    predicate: Callable[[], bool],
    what: str,
    timeout_s: float = WAIT_S,
    poll_s: float = POLL_S,
    detail: Callable[[], str] | None = None,
) -> None:
    """`eventually` for a test without an event loop (it blocks the thread while it polls).
    `detail`, if given, is called on failure and appended to the message (e.g. a child's log)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout_s:g} s waiting for {what}"
            raise AssertionError(f"{message}\n{detail()}" if detail is not None else message)
        time.sleep(poll_s)


async def stays_true(predicate: Predicate, for_s: float, what: str, poll_s: float = POLL_S) -> None:
    """Check that `predicate` holds throughout the next `for_s` seconds (and at both ends).

    The only place a test pauses for a fixed time: use it only to show that something does not
    happen, and pick `for_s` from the behaviour under test (e.g. a few quiet periods), at most
    `MAX_STAYS_S`. When there is a real condition to wait for, use `eventually` instead.
    """
    if not 0 < for_s <= MAX_STAYS_S:
        raise ValueError(f"stays_true: for_s must be in (0, {MAX_STAYS_S:g}] seconds, not {for_s!r}")
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + for_s
    while True:
        if not await _holds(predicate):
            raise AssertionError(f"{what}: stopped holding after {loop.time() - start:.3f} s of {for_s:g} s")
        left = end - loop.time()
        if left <= 0:
            return
        await asyncio.sleep(min(poll_s, left))
