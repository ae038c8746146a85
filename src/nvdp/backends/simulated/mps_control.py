"""A stand-in for `nvidia-cuda-mps-control`, for CPU tests and `nvdp demo --sharing mps`.

Run as `nvdp simulate mps-control [-d]` (`python -m nvdp simulate mps-control`). It speaks the
control protocol the plugin and the MPS daemon use, in the folders the real one uses:

- `-d`: start the control daemon in the background (it forks, as the real one does, and the
  command returns once it listens) on `$CUDA_MPS_PIPE_DIRECTORY/control` (a unix socket here),
  logging to `$CUDA_MPS_LOG_DIRECTORY/control.log` in the real one's line format;
- no argument: client mode. Each line of stdin is one command (`get_default_active_thread_percentage`,
  `set_default_active_thread_percentage <p>`, `get_default_device_pinned_mem_limit <dev>`,
  `set_default_device_pinned_mem_limit <dev> <n>M`, `get_server_list`, `quit`); answers go to
  stdout. Without a daemon it fails (status 1), as the real one does.

The daemon keeps its state in the pipe folder: `sim-state.json` (every command received, in
order, and the current defaults) and `sim-daemon.pid`. Faults for tests: a file
`sim-fail-starts` in the pipe folder holding N makes the next N `-d` starts fail. The daemon
exits when its pipe folder disappears, so a test's temporary folder never leaves one behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
DEFAULT_PIPE = "/tmp/nvidia-mps"
DEFAULT_LOG = "/var/log/nvidia-mps"
SOCKET = "control"
STATE = "sim-state.json"
PID = "sim-daemon.pid"
FAIL_STARTS = "sim-fail-starts"
START_TIMEOUT_S = 10.0
WATCH_S = 0.5  # how often the daemon checks that its pipe folder still exists
CLIENT_TIMEOUT_S = 5.0


def main(argv: Sequence[str], environ: Mapping[str, str], stdin: IO[str], stdout: IO[str]) -> int:
    pipe = Path(environ.get(PIPE_ENV) or DEFAULT_PIPE)
    logs = Path(environ.get(LOG_ENV) or DEFAULT_LOG)
    if list(argv) == ["-d"]:
        return start_daemon(pipe, logs, stdout)
    if argv:
        print(f"usage: nvidia-cuda-mps-control [-d]; got {' '.join(argv)}", file=stdout)
        return 1
    return client(pipe, stdin.read().splitlines(), stdout)


# --- client ------------------------------------------------------------------------------------


def client(pipe: Path, lines: Sequence[str], stdout: IO[str]) -> int:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(CLIENT_TIMEOUT_S)
            conn.connect(str(pipe / SOCKET))
            conn.sendall("".join(f"{line}\n" for line in lines).encode())
            conn.shutdown(socket.SHUT_WR)
            answer = _read_all(conn)
    except OSError as exc:
        print(f"Cannot find MPS control daemon process ({pipe / SOCKET}: {exc.strerror or exc})", file=stdout)
        return 1
    stdout.write(answer)
    return 0


def _read_all(conn: socket.socket) -> str:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks).decode()


# --- daemon ------------------------------------------------------------------------------------


def start_daemon(pipe: Path, logs: Path, stdout: IO[str]) -> int:
    pipe.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    if _answers(pipe):
        print("An instance of this daemon is already running", file=stdout)
        return 1
    refusal = _take_fault(pipe)
    if refusal:
        print(refusal, file=stdout)
        return 1
    if len(str(pipe / SOCKET)) > 107:
        print(f"pipe directory too long for a unix socket: {pipe}", file=stdout)
        return 1
    ready_r, ready_w = os.pipe()
    stdout.flush()
    pid = os.fork()
    if pid:  # the command: wait until the daemon listens
        os.close(ready_w)
        os.waitpid(pid, 0)  # the first child exits as soon as it has forked the daemon
        readable, _, _ = select.select([ready_r], [], [], START_TIMEOUT_S)
        ok = bool(readable) and os.read(ready_r, 1) == b"1"
        os.close(ready_r)
        if not ok:
            print("the control daemon did not start", file=stdout)
        return 0 if ok else 1
    os.close(ready_r)
    os.setsid()
    if os.fork():
        os._exit(0)
    _detach_stdio()
    try:
        Daemon(pipe, logs).serve(ready_w)
    finally:
        os._exit(0)


def _answers(pipe: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(1.0)
        try:
            conn.connect(str(pipe / SOCKET))
        except OSError:
            return False
    return True


def _take_fault(pipe: Path) -> str:
    path = pipe / FAIL_STARTS
    try:
        left = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return ""
    if left <= 0:
        return ""
    path.write_text(str(left - 1))
    return f"simulated start failure ({left - 1} more to come)"


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


class Daemon:
    def __init__(self, pipe: Path, logs: Path) -> None:
        self.pipe = pipe
        self.logs = logs
        self.state: dict[str, Any] = {
            "pid": os.getpid(),
            "active_thread_percentage": 100.0,
            "pinned_mem_limits": {},
            "commands": [],
        }
        self.running = True

    def log(self, message: str) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        with contextlib.suppress(OSError), open(self.logs / "control.log", "a", encoding="utf-8") as f:
            f.write(f"[{stamp} Control {os.getpid()}] {message}\n")

    def save(self) -> None:
        tmp = self.pipe / f".{STATE}.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.pipe / STATE)

    def serve(self, ready_fd: int) -> None:
        path = self.pipe / SOCKET
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by a daemon that died
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(path))
            server.listen(16)
            server.settimeout(WATCH_S)
            identity = path.stat().st_ino
            (self.pipe / PID).write_text(f"{os.getpid()}\n")
            self.save()
            self.log(f"Starting control daemon using socket {path}")
            self.log(f"To connect CUDA applications to this daemon, set env {PIPE_ENV}={self.pipe}")
            os.write(ready_fd, b"1")
            os.close(ready_fd)
            while self.running:
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    if not _still_ours(path, identity):
                        return  # the folder was removed (or another daemon took the socket)
                    continue
                with conn:
                    self.handle(conn)
        for name in (SOCKET, PID):
            with contextlib.suppress(FileNotFoundError):
                (self.pipe / name).unlink()
        self.log("Exit")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(CLIENT_TIMEOUT_S)
        self.log("Accepting connection...")
        self.log("NEW UI")
        try:
            text = _read_all(conn)
        except OSError:
            return
        answers = []
        for line in text.splitlines():
            if line.strip():
                self.log(f"Cmd:{line.strip()}")
                answers.append(self.command(line.split()))
        self.save()
        with contextlib.suppress(OSError):
            conn.sendall("".join(f"{a}\n" for a in answers if a).encode())
        self.log("UI closed")

    def command(self, words: list[str]) -> str:
        self.state["commands"].append(" ".join(words))
        name, args = words[0], words[1:]
        limits: dict[str, str] = self.state["pinned_mem_limits"]
        if name == "get_default_active_thread_percentage" and not args:
            return f"{self.state['active_thread_percentage']:.1f}"
        if name == "set_default_active_thread_percentage" and len(args) == 1:
            try:
                value = float(args[0])
            except ValueError:
                return f"Invalid percentage: {args[0]}"
            if not 0 < value <= 100:
                return f"Invalid percentage: {args[0]}"
            self.state["active_thread_percentage"] = value
            return ""
        if name == "get_default_device_pinned_mem_limit" and len(args) == 1:
            return limits.get(args[0], "0")
        if name == "set_default_device_pinned_mem_limit" and len(args) == 2:
            if not (args[1].endswith(("M", "G")) and args[1][:-1].isdigit()):
                return f"Invalid memory limit: {args[1]}"
            limits[args[0]] = args[1]
            return ""
        if name == "get_server_list" and not args:
            return ""
        if name == "quit" and not args:
            self.running = False
            return ""
        return f"Invalid command: {' '.join(words)}"


def _still_ours(path: Path, identity: int) -> bool:
    try:
        return path.stat().st_ino == identity
    except OSError:
        return False


def read_state(pipe: str | Path) -> dict[str, Any]:
    """The simulated daemon's state (tests and the demo read it)."""
    state: dict[str, Any] = json.loads((Path(pipe) / STATE).read_text())
    return state
