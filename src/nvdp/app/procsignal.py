"""Signal the plugin in a shared process namespace, as the official config-manager finds it: the
first process (lowest PID) whose argv[0] is exactly the name (`nvidia-device-plugin`).

nvdp waits, before signalling, until that process has a handler for the signal (SigCgt in
/proc/<pid>/status): a plugin still starting would otherwise be killed by SIGHUP's default action,
and it reads the new config anyway once it gets that far. A plugin that is not running at all
needs no signal: it reads the link when it starts.
"""

from __future__ import annotations

import asyncio
import enum
import os

POLL_S = 0.05


class Signalled(enum.Enum):
    SENT = "sent"
    NOT_RUNNING = "not running"  # nothing to signal: it reads the new config when it starts
    SENT_UNHANDLED = "sent before a handler was installed"  # waited `wait_s`, then sent anyway


def find_process(name: str, proc: str = "/proc") -> int | None:
    pids = sorted(int(entry) for entry in os.listdir(proc) if entry.isdigit())
    for pid in pids:
        try:
            with open(os.path.join(proc, str(pid), "cmdline"), "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0]
        except OSError:  # gone since the listing, or not ours to read
            continue
        if argv0.decode("utf-8", "replace") == name:
            return pid
    return None


def catches(pid: int, signal: int, proc: str = "/proc") -> bool | None:
    """Whether `pid` has a handler for `signal` (None: the process is gone)."""
    try:
        with open(os.path.join(proc, str(pid), "status"), encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal - 1) & 1)
    except OSError:
        return None
    return False


async def signal_process(name: str, signal: int, proc: str = "/proc", wait_s: float = 10.0) -> Signalled:
    pid = find_process(name, proc)
    if pid is None:
        return Signalled.NOT_RUNNING
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        handled = catches(pid, signal, proc)
        if handled is None:
            return Signalled.NOT_RUNNING
        if handled or loop.time() >= deadline:
            try:
                os.kill(pid, signal)
            except ProcessLookupError:
                return Signalled.NOT_RUNNING
            return Signalled.SENT if handled else Signalled.SENT_UNHANDLED
        await asyncio.sleep(POLL_S)
