"""The real `nvidia-device-plugin` console script as a child process, for benchmarks and tests.

What a node runs is a fresh interpreter started from the console script, so start-up, memory
and crash recovery are measured on exactly that (not on an in-process `Plugin`).

Resource handling: `start()` spawns the child with stdout/stderr going to a log file in the
folder; `stop()` sends SIGTERM (SIGKILL after a timeout) and waits; `kill()` sends SIGKILL and
leaves the socket files behind, as a crash would. Use `async with` to never leak a child.
`StalledReader` is a ListAndWatch client in a child process that stops reading (SIGSTOP).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

CONSOLE_SCRIPT = "nvidia-device-plugin"


def console_script(name: str = CONSOLE_SCRIPT) -> str:
    """The installed console script next to this interpreter (a venv), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable} nor on PATH")
    return found


def memory_kib(pid: int) -> dict[str, int]:
    """The Vm* and Rss* lines of /proc/<pid>/status, in KiB: VmRSS = RssAnon + RssFile + RssShmem."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith(("Vm", "Rss")) and rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0])
    return values


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS, in KiB)."""
    return memory_kib(pid)["VmRSS"]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class PluginProcess:
    """`nvidia-device-plugin --kubelet-socket <folder>/kubelet.sock <args>` as a child process
    (`command`: another program taking the same flags, e.g. the NVML-path benchmark's)."""

    def __init__(
        self,
        folder: str,
        args: Sequence[str] = ("--simulate", "dgx-h100"),
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
        argv0: str | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.folder = folder
        # Set: run `python -m nvdp.entrypoint` with this argv[0], as the image's wrapper does, so a
        # config-manager looking for the process by name finds it.
        self.argv0 = argv0
        self.command = list(command) if command is not None else None
        self.args = [f"--kubelet-socket={os.path.join(folder, 'kubelet.sock')}", *args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path or os.path.join(folder, "plugin.log")
        self.process: asyncio.subprocess.Process | None = None
        self.spawned_at = 0.0  # time.monotonic() just before the spawn

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the plugin process is not running")
        return self.process.pid

    async def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.spawned_at = time.monotonic()
            if self.argv0 is None:
                program = self.command or [console_script()]
                self.process = await asyncio.create_subprocess_exec(
                    *program, *self.args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=self.env
                )
            else:
                self.process = await asyncio.create_subprocess_exec(
                    self.argv0, "-m", "nvdp.entrypoint", *self.args, executable=sys.executable,
                    stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                    env={**self.env, "PYTHONEXECUTABLE": sys.executable},
                )

    def signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(sig)

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        process, self.process = self.process, None
        if process is None:
            return 0
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        assert process.returncode is not None
        return process.returncode

    async def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill: nothing is cleaned up."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    def log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return Path(self.log_path).read_text(errors="replace")
        return ""

    async def __aenter__(self) -> PluginProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def process_state(pid: int) -> str:
    """The one-letter state of /proc/<pid>/stat: R running, S sleeping, T stopped, Z zombie..."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0]  # the command name (in parentheses) may hold spaces


class StalledReader:
    """A ListAndWatch client (`python -m nvdp.testing.stalled_reader`) that reads `messages`
    messages and then stops itself with SIGSTOP, keeping its connection open and unread.

    Resource handling: `start()` returns once the child is stopped; `kill()` (or leaving the
    `async with`) sends SIGKILL, which also ends a stopped process, and reaps it.
    """

    def __init__(self, socket_path: str, messages: int = 1) -> None:
        self.socket_path = socket_path
        self.messages = messages
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 30.0) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nvdp.testing.stalled_reader", self.socket_path, str(self.messages),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.process.stdout.readline()
            if line.strip() != b"stalled":
                raise RuntimeError(f"the stalled reader exited before stalling: {line!r}")
            while process_state(self.process.pid) != "T":
                await asyncio.sleep(0.005)

    def resume(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)

    async def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    async def __aenter__(self) -> StalledReader:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()
