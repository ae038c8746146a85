"""A kubelet that refuses registration, hangs, is absent, or left a dead socket behind: the plugin
retries with bounded back-off, logs one clear line per state change, and registers when it returns.

Most cases shorten the back-off through the RetryPolicy seam; one keeps the node's defaults and
the kubelet away for several seconds.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nvdp.app.plugin import Plugin
from nvdp.config.options import Config
from nvdp.kubelet.manager import RetryPolicy
from nvdp.testing import WAIT_S, FakeKubelet, eventually
from tests.conftest import running_plugin
from tests.reliability.conftest import LogWatch

GPU = "nvidia.com/gpu"
FAST = RetryPolicy(first_s=0.01, max_s=0.08, timeout_s=0.3)
FAILED = "registration failed"
REGISTERED = "registered with the kubelet"
ABSENT_S = 6.0  # with the default policy: 0.05 s doubling to 5 s, so the cap is reached


def most_attempts(policy: RetryPolicy, elapsed: float) -> int:
    """An upper bound on the attempts that fit in `elapsed` seconds: attempt k+1 comes at least
    delay(1) + ... + delay(k) after the first (each attempt itself takes time too)."""
    attempts, spent = 1, 0.0
    while spent + policy.delay(attempts) <= elapsed:
        spent += policy.delay(attempts)
        attempts += 1
    return attempts


def state_lines(logs: LogWatch) -> list[str]:
    """The manager's registration-state log lines, each shortened to FAILED or REGISTERED."""
    found = []
    for r in logs.records:
        message = r.getMessage()
        if r.name == "nvdp.manager" and message.startswith((FAILED, REGISTERED)):
            found.append(FAILED if message.startswith(FAILED) else REGISTERED)
    return found


def failure_reasons(logs: LogWatch) -> list[str]:
    return [str(r.__dict__.get("error")) for r in logs.records if r.getMessage().startswith(FAILED)]


async def wait_failures(plugin: Plugin, count: int) -> None:
    await eventually(lambda: plugin.manager.registration_failures >= count, f"{count} failed registrations")


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        pytest.param("refuse", "refused nvidia.com/gpu: UNKNOWN: device plugins are paused", id="refuses"),
        pytest.param("hang", "did not answer", id="hangs"),
        pytest.param("dead socket", "did not answer", id="dead kubelet.sock left behind"),
        pytest.param("absent", "does not exist", id="absent"),
    ],
)
async def test_retries_then_registers_when_the_kubelet_recovers(
    plugin_dir: Path, make_config: Callable[..., Config], logs: LogWatch, setup: str, reason: str
) -> None:
    kubelet = FakeKubelet(str(plugin_dir))
    leftover: socket.socket | None = None
    if setup == "refuse":
        kubelet.refuse_with = "device plugins are paused"
    if setup == "hang":
        kubelet.register_delay = 3600.0
    if setup in ("refuse", "hang"):
        await kubelet.start()
    if setup == "dead socket":  # bound, never listening: what a crashed kubelet leaves behind
        leftover = socket.socket(socket.AF_UNIX)
        leftover.bind(str(plugin_dir / "kubelet.sock"))
    try:
        async with running_plugin(make_config("dgx-h100"), retry=FAST) as plugin:
            started = time.monotonic()
            await wait_failures(plugin, 6)  # past the cap: delays 0.01, 0.02, 0.04, 0.08, 0.08
            elapsed = time.monotonic() - started
            assert plugin.manager.registration_failures <= most_attempts(FAST, elapsed) + 1
            assert not plugin.manager.all_registered

            # The kubelet recovers.
            if setup == "dead socket" and leftover is not None:
                leftover.close()
                (plugin_dir / "kubelet.sock").unlink()
            if setup in ("refuse", "hang"):
                await kubelet.stop()
                kubelet.refuse_with, kubelet.register_delay = None, 0.0
            await kubelet.start()
            await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
            await eventually(lambda: plugin.manager.all_registered, "every resource registered")
            lines = state_lines(logs)
    finally:
        await kubelet.stop()
        if leftover is not None:
            leftover.close()
    # One line for the failing state (however many retries), one for the recovery.
    assert lines == [FAILED, REGISTERED]
    assert reason in failure_reasons(logs)[0]


async def test_one_line_per_state_change(
    plugin_dir: Path, make_config: Callable[..., Config], logs: LogWatch
) -> None:
    """absent -> refusing -> accepting: two failure lines (one per state) and one success."""
    kubelet = FakeKubelet(str(plugin_dir))
    async with running_plugin(make_config("dgx-h100"), retry=FAST) as plugin:
        await wait_failures(plugin, 5)
        kubelet.refuse_with = "not yet"
        await kubelet.start()
        await kubelet.wait_for(lambda: sum(e.kind == "rejected" for e in kubelet.events) >= 5, WAIT_S)
        kubelet.refuse_with = None
        await kubelet.wait_registered(GPU, timeout=WAIT_S)
        await eventually(lambda: plugin.manager.all_registered, "every resource registered")
        lines = state_lines(logs)
    await kubelet.stop()
    assert lines == [FAILED, FAILED, REGISTERED]
    errors = failure_reasons(logs)
    assert "does not exist" in errors[0] and "not yet" in errors[1]


@pytest.mark.slow
async def test_absent_for_seconds_with_the_default_policy(
    plugin_dir: Path, make_config: Callable[..., Config], logs: LogWatch
) -> None:
    policy = RetryPolicy()
    async with running_plugin(make_config("dgx-h100")) as plugin:
        started = time.monotonic()
        await asyncio.sleep(ABSENT_S)  # what is tested: the kubelet away this long, the back-off at its cap
        failures, elapsed = plugin.manager.registration_failures, time.monotonic() - started
        assert 3 <= failures <= most_attempts(policy, elapsed) + 1  # retried, and backed off
        async with FakeKubelet(str(plugin_dir)) as kubelet:
            await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
            # The new kubelet.sock wakes the plugin: it does not wait out the back-off.
            assert plugin.manager.registration_failures <= failures + 1
            lines = state_lines(logs)
    assert lines == [FAILED, REGISTERED]
