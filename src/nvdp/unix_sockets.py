"""The rules for every unix socket nvdp binds (the resource sockets, the fault-injection socket).

- Only a socket is ever replaced: a stale socket file from an earlier run is removed before
  binding; a regular file, a directory or anything else at the path is left alone and reported
  (`replace_problem`), so a mistyped path can never delete a file or the kubelet's folder.
- A socket is created 0600 whatever the process umask (`private_umask` around the bind, then an
  explicit chmod): only its owner (root on a node, as the kubelet) may connect.
- On stop only our own socket is removed: the path must still be the socket we bound (same
  device and inode), not one that somebody else bound there since (`remove_if_ours`).
- `close_connections` shuts down the connections a server accepted on a path: the one way to
  free a gRPC server whose client stopped reading (see `kubelet/server.py`).

Linux only (the forced close reads /proc/self/fd), as the device plugin is.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from typing import NamedTuple

SOCKET_MODE = 0o600
_PRIVATE_UMASK = 0o177  # 0777 & ~0177 = 0600


class Identity(NamedTuple):
    """Which file a path names: a socket re-created at the same path is a different identity."""

    device: int
    inode: int
    ctime_ns: int


def identity(path: str) -> Identity | None:
    """The identity of whatever is at `path` (not following a symbolic link), None when nothing is."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return Identity(st.st_dev, st.st_ino, st.st_ctime_ns)


def kind(path: str) -> str | None:
    """What is at `path` in words ("a socket", "a regular file", "a directory", ...), None when nothing."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    for test, words in ((stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                        (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a named pipe")):
        if test(mode):
            return words
    return "a device node"


def is_socket(path: str) -> bool:
    return kind(path) == "a socket"


def replace_problem(path: str) -> str | None:
    """Why nvdp must not bind at `path` (something other than a socket is there), None when it may."""
    try:
        what = kind(path)
    except OSError as exc:  # e.g. a path through a regular file, or no permission
        return f"cannot check {path}: {exc.strerror or exc}"
    if what is None or what == "a socket":
        return None
    return (f"{path} exists and is {what}, not a socket; nvdp replaces only a stale socket, "
            "so remove it or pick another path")


def is_listening(path: str) -> bool:
    """Whether a process accepts connections on the socket at `path` (a live one, not stale)."""
    if not is_socket(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except BlockingIOError:  # the listener's backlog is full: live
            return True
        except OSError:
            return False
    return True


def remove_stale(path: str) -> None:
    """Remove a stale socket before binding (nothing else: check `replace_problem` first)."""
    if is_socket(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Bind inside this block: the socket file is created 0600 whatever the umask. (The umask is
    per process; nothing else in nvdp creates files, so the short window is harmless.)"""
    previous = os.umask(_PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def bound(path: str) -> Identity | None:
    """Just after binding at `path`: make the mode 0600 (in case the bind did not) and return the
    socket's identity, which `remove_if_ours` and liveness checks compare against."""
    os.chmod(path, SOCKET_MODE)
    return identity(path)


def is_ours(path: str, ours: Identity | None) -> bool:
    """Whether `path` is still the socket we bound (a socket, same device and inode)."""
    now = identity(path)
    return ours is not None and now is not None and now[:2] == ours[:2] and is_socket(path)


def remove_if_ours(path: str, ours: Identity | None) -> bool:
    """Remove `path` only when it is still our socket; returns whether it did."""
    if not is_ours(path, ours):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


def close_connections(path: str) -> int:
    """Shut down every connection accepted on the unix socket bound at `path` (its listening
    socket is left alone); returns how many. The peer sees the connection end; the server's
    reads and writes on it fail at once, so a transport blocked in a write to a peer that
    stopped reading is released.

    Each descriptor is looked at in place (wrapped, then detached: no descriptor is created or
    closed here, so this works, and leaks nothing, even with the descriptor table full)."""
    wanted = os.path.normpath(path)
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    closed = 0
    for name in names:
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:  # closed meanwhile, or not a socket after all
            continue
        try:
            if (sock.family != socket.AF_UNIX or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    or not isinstance(local := sock.getsockname(), str) or os.path.normpath(local) != wanted):
                continue
            sock.shutdown(socket.SHUT_RDWR)  # the connection itself: whoever holds the descriptor sees it
            closed += 1
        except OSError:
            continue
        finally:
            sock.detach()  # the descriptor stays open: it is its owner's (gRPC's) to close
    return closed
