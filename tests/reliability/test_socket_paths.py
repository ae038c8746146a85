"""Every socket nvdp binds replaces only a stale socket, is created 0600 whatever the umask, and
is removed on stop only while it is still ours. On the real console script.

`--simulate-control PATH` used to unlink whatever PATH was: a regular file was deleted, and the
kubelet's own kubelet.sock was replaced (after which no plugin on the node could register).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdp.backends.simulated.control import request
from nvdp.testing import WAIT_S, FakeKubelet, eventually
from nvdp.testing.process import PluginProcess

GPU = "nvidia.com/gpu"


async def exit_code(plugin: PluginProcess) -> int:
    """Wait for the child to exit by itself (AssertionError if it keeps running)."""
    assert plugin.process is not None
    try:
        return await asyncio.wait_for(plugin.process.wait(), WAIT_S)
    except TimeoutError:
        raise AssertionError(f"still running after {WAIT_S:g} s:\n{plugin.log()[-2000:]}") from None


def sockets_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_socket() and p.name != "kubelet.sock")


@contextlib.contextmanager
def listening(path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        sock.listen()
        yield sock


@pytest.mark.parametrize("occupant", ["regular file", "directory", "the kubelet's socket", "a live socket"])
async def test_simulate_control_on_anything_but_a_stale_socket_is_exit_2(
    kubelet: FakeKubelet, plugin_dir: Path, occupant: str
) -> None:
    target = plugin_dir / "control"
    with contextlib.ExitStack() as stack:
        if occupant == "regular file":
            target.write_text("precious\n")
        elif occupant == "directory":
            target.mkdir()
        elif occupant == "the kubelet's socket":
            target = plugin_dir / "kubelet.sock"
        else:
            stack.enter_context(listening(target))
        before = os.lstat(target)
        plugin = PluginProcess(str(plugin_dir), ("--simulate", "dgx-h100", f"--simulate-control={target}"))
        await plugin.start()
        try:
            code = await exit_code(plugin)
        finally:
            await plugin.stop()
        after = os.lstat(target)
    log = plugin.log()
    assert code == 2, log[-2000:]
    assert f"invalid --simulate-control: {target}" in log, log[-2000:]
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)  # left as it was
    if occupant == "regular file":
        assert target.read_text() == "precious\n"
    assert sockets_in(plugin_dir) == ([] if occupant != "a live socket" else ["control"])  # nothing was opened
    assert not any(e.kind == "register" for e in kubelet.events)
    if occupant == "the kubelet's socket":  # the kubelet still takes registrations
        async with PluginProcess(str(plugin_dir)):
            await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)


async def test_a_stale_control_socket_is_replaced(kubelet: FakeKubelet, plugin_dir: Path) -> None:
    target = plugin_dir / "control.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(target))  # bound, never listening: what a killed plugin leaves
    async with PluginProcess(str(plugin_dir), ("--simulate", "dgx-h100", f"--simulate-control={target}")):
        await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
        reply = await asyncio.to_thread(request, str(target), {"command": "xid", "gpu": 0, "xid": 13})
        assert reply["ok"], reply


async def test_on_stop_only_our_own_sockets_are_removed(kubelet: FakeKubelet, plugin_dir: Path) -> None:
    target = plugin_dir / "control.sock"
    plugin = PluginProcess(str(plugin_dir), ("--simulate", "dgx-h100", f"--simulate-control={target}"))
    async with plugin:
        await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
        await eventually(target.is_socket, "the control socket")
        target.unlink()
        target.write_text("somebody else's\n")  # not ours any more
        code = await plugin.stop()
    assert code == 0, plugin.log()[-2000:]
    assert target.read_text() == "somebody else's\n"
    assert not (plugin_dir / "nvidia-gpu.sock").exists()  # ours: removed


@pytest.mark.parametrize("occupant", ["regular file", "directory"])
async def test_a_resource_socket_path_taken_by_a_file_is_left_alone(
    kubelet: FakeKubelet, plugin_dir: Path, occupant: str
) -> None:
    target = plugin_dir / "nvidia-gpu.sock"
    if occupant == "regular file":
        target.write_text("precious\n")
    else:
        target.mkdir()
    plugin = PluginProcess(str(plugin_dir))
    await plugin.start()
    try:
        code = await exit_code(plugin)
    finally:
        await plugin.stop()
    log = plugin.log()
    assert code == 1, log[-2000:]
    assert f"{target} exists and is a {occupant}, not a socket" in log, log[-2000:]
    assert target.is_dir() if occupant == "directory" else target.read_text() == "precious\n"


async def test_sockets_are_0600_under_umask_000(kubelet: FakeKubelet, plugin_dir: Path) -> None:
    control = plugin_dir / "control.sock"
    plugin = PluginProcess(str(plugin_dir), ("--simulate", "dgx-h100", f"--simulate-control={control}"))
    previous = os.umask(0)  # the child inherits it
    try:
        await plugin.start()
    finally:
        os.umask(previous)
    try:
        await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
        await eventually(control.is_socket, "the control socket")
        modes = {p.name: oct(stat.S_IMODE(p.lstat().st_mode)) for p in (plugin_dir / "nvidia-gpu.sock", control)}
        await kubelet.restart()  # the resource socket is created again
        await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
        again = plugin_dir / "nvidia-gpu.sock"
        modes["nvidia-gpu.sock after a kubelet restart"] = oct(stat.S_IMODE(again.lstat().st_mode))
    finally:
        await plugin.stop()
    print(modes)
    assert set(modes.values()) == {"0o600"}, modes
