"""Long lines on the fault-injection control socket: a legitimate 10,000-device mig-layout is
answered, a line over the limit gets an error naming it, and the connection goes on. Lines over
64 KiB used to drop the connection with "Unhandled exception in client_connected_cb"."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nvdp.config.options import Config
from nvdp.testing import WAIT_S, FakeKubelet
from tests.conftest import running_plugin
from tests.reliability.conftest import LogWatch


def exchange(path: str, lines: list[bytes]) -> list[dict[str, Any]]:
    """Send each line on one connection and read one reply line for each."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT_S)
        sock.connect(path)
        replies: list[dict[str, Any]] = []
        pending = b""
        for line in lines:
            sock.sendall(line)
            while b"\n" not in pending:
                chunk = sock.recv(65536)
                if not chunk:
                    raise AssertionError(f"connection closed after {len(replies)} replies")
                pending += chunk
            reply, pending = pending.split(b"\n", 1)
            replies.append(json.loads(reply))
    return replies


async def test_long_control_lines(
    kubelet: FakeKubelet, plugin_dir: Path, make_config: Callable[..., Config], logs: LogWatch
) -> None:
    control = str(plugin_dir / "control.sock")
    layout = {"command": "mig-layout", "gpu": 0, "devices": ["1g.10gb"] * 10_000, "no_rescan": True}
    big = json.dumps(layout).encode() + b"\n"
    huge = json.dumps({"command": "xid", "gpu": 0, "xid": 13, "pad": "x" * 2_000_000}).encode() + b"\n"
    small = json.dumps({"command": "xid", "gpu": 0, "xid": 13}).encode() + b"\n"
    async with running_plugin(make_config("dgx-h100", simulate_control=control)):
        await kubelet.wait_registered("nvidia.com/gpu", timeout=WAIT_S, min_devices=8)
        replies = await asyncio.to_thread(exchange, control, [big, huge, small])
    print(f"{len(big)} B line: {replies[0]}; {len(huge)} B line: {replies[1]}")
    assert replies[0]["ok"] is True and "10000x1g.10gb" in replies[0]["message"], replies[0]
    assert replies[1] == {"ok": False, "error": replies[1]["error"]} and "1 MiB" in replies[1]["error"]
    assert replies[2]["ok"] is True  # the same connection goes on
