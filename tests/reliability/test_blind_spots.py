"""What the plugin used to miss or drown in its own log: a kubelet.sock that is not a socket, our
socket replaced by a file or a folder, and one log line per XID ignored by policy."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.options import Config
from nvdp.kubelet.manager import RetryPolicy
from nvdp.testing import WAIT_S, FakeKubelet, eventually
from tests.conftest import running_plugin
from tests.reliability.conftest import LogWatch

GPU = "nvidia.com/gpu"
FAST = RetryPolicy(first_s=0.01, max_s=0.2, timeout_s=0.5)


def make_file(path: Path) -> None:
    path.write_text("not a socket\n")


def make_folder(path: Path) -> None:
    path.mkdir()


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


@pytest.mark.parametrize("make", [make_file, make_folder], ids=["regular file", "directory"])
async def test_a_kubelet_sock_that_is_not_a_socket_is_named_so(
    plugin_dir: Path, make_config: Callable[..., Config], logs: LogWatch, make: Callable[[Path], None]
) -> None:
    what = "a regular file" if make is make_file else "a directory"
    make(plugin_dir / "kubelet.sock")
    async with running_plugin(make_config("dgx-h100"), retry=FAST) as plugin:
        await eventually(lambda: plugin.manager.registration_failures > 0, "a failed registration")
        kubelet = FakeKubelet(str(plugin_dir))
        warned = [r.getMessage() + " " + str(getattr(r, "error", "")) for r in logs.records
                  if r.name == "nvdp.manager" and r.levelno == logging.WARNING]
        assert any(f"is {what}, not a socket" in w for w in warned), warned
        remove(plugin_dir / "kubelet.sock")
        async with kubelet:  # the real kubelet comes: registration goes through
            await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)


@pytest.mark.parametrize("make", [make_file, make_folder], ids=["regular file", "directory"])
async def test_our_socket_replaced_by_a_file_or_folder_is_noticed(
    kubelet: FakeKubelet, plugin_dir: Path, make_config: Callable[..., Config], logs: LogWatch,
    make: Callable[[Path], None],
) -> None:
    logs.allowed.append("cannot serve; retrying on the next folder change")
    ours = plugin_dir / "nvidia-gpu.sock"
    async with running_plugin(make_config("dgx-h100"), retry=FAST) as plugin:
        await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
        server = plugin.manager.servers[GPU]
        ours.unlink()
        make(ours)  # somebody puts a file (or folder) where our socket was
        await eventually(lambda: not server.socket_alive() and GPU not in plugin.manager.registered,
                         "the plugin to see that its socket is gone")
        await eventually(lambda: GPU in plugin.manager.serve_failures, "the serve failure to be recorded")
        assert "not a socket" in plugin.manager.serve_failures[GPU]
        assert ours.exists() and not ours.is_socket()  # left alone: never replaced
        remove(ours)
        await eventually(lambda: plugin.manager.all_registered, "serving and registered again")
        assert ours.is_socket()


async def test_our_socket_replaced_by_another_socket_is_noticed(
    kubelet: FakeKubelet, plugin_dir: Path, make_config: Callable[..., Config], logs: LogWatch
) -> None:
    import socket

    ours = plugin_dir / "nvidia-gpu.sock"
    async with running_plugin(make_config("dgx-h100"), retry=FAST) as plugin:
        await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
        registrations = plugin.manager.registrations
        ours.unlink()
        with socket.socket(socket.AF_UNIX) as stranger:
            stranger.bind(str(ours))  # another process's socket at our path: nobody answers there
            await eventually(lambda: plugin.manager.registrations > registrations, "a new registration")
        assert os.path.exists(ours) and plugin.manager.servers[GPU].socket_alive()


async def test_1000_ignored_xids_are_two_log_lines_and_exact_counts(
    kubelet: FakeKubelet, make_config: Callable[..., Config], logs: LogWatch
) -> None:
    events = 1000
    async with running_plugin(make_config("dgx-h100")) as plugin:
        await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
        backend = plugin.backend
        assert isinstance(backend, SimulatedBackend)
        gpu = backend.gpu_uuid(0)
        for _ in range(events):
            backend.inject_xid(0, 13)  # XID 13 is ignored by the default policy
        await eventually(lambda: plugin.stats.snapshot().health_events.get((gpu, "xid"), 0) == events,
                         "every event counted")
    lines = [r for r in logs.records if r.name == "nvdp.healthwatch" and "ignored by policy" in r.getMessage()]
    print(f"{len(lines)} log lines for {events} ignored XIDs")
    assert [r.getMessage() for r in lines] == ["health event ignored by policy",
                                               "health events ignored by policy (repeats)"]
    assert getattr(lines[1], "repeats", None) == events - 1 and getattr(lines[1], "xid", None) == 13
