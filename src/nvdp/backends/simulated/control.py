"""The simulated node's control socket: fault injection from outside the process.

Protocol (kept trivial on purpose): a unix stream socket; each request is one JSON object on one
line with a "command" field and the command's arguments; each reply is one JSON object on one
line, `{"ok": true, "message": ...}` or `{"ok": false, "error": ...}`. A connection may carry any
number of requests; a line may be up to `MAX_LINE_BYTES` long (a longer one is answered with an
error naming the limit, and the connection goes on). `nvdp simulate inject --control PATH ...` is
the command-line client.

The socket is created 0600 and replaces only a stale socket: a file, a folder, the kubelet's
socket or a socket something listens on is refused (`path_problem`, checked before the plugin
opens anything); on close it is removed only if it is still ours.

Commands live in `COMMANDS`; adding one is a function decorated with `@command("name")` that
takes the `ControlContext` and the request's `Args` and returns the reply fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nvdp import unix_sockets
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.core.mig import describe_layout
from nvdp.core.xid_policy import RecoveryAction, recovery_label
from nvdp.errors import ConfigError, PluginError

log = logging.getLogger("nvdp.simcontrol")  # stable name: operators filter on it

Reply = dict[str, Any]
# The largest legitimate request is a mig-layout listing many devices: 10,000 profile names are
# about 110 KB. asyncio's default (64 KiB) dropped such a line with a traceback.
MAX_LINE_BYTES = 1024 * 1024
FLAG = "--simulate-control"


class ControlError(Exception):
    """A request the control socket cannot carry out; the message goes back to the client."""


@dataclass(frozen=True)
class ControlContext:
    """What commands may act on: the current simulated backend (None while there is none) and a
    way to make the plugin rediscover the node (after a change of its layout): `rescan` serves a
    changed node now and says whether it applied one."""

    backend: Callable[[], object | None]
    request_reload: Callable[[], None]
    rescan: Callable[[], Awaitable[bool]] | None = None

    def simulated(self) -> SimulatedBackend:
        backend = self.backend()
        if not isinstance(backend, SimulatedBackend):
            raise ControlError("the plugin is not running on a simulated node")
        return backend


class Args:
    """A request's arguments with typed access; errors name the field."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw

    def integer(self, name: str, default: int | None = None, minimum: int | None = None) -> int:
        value = self.raw.get(name, default)
        if value is None:
            raise ControlError(f"missing field {name!r}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ControlError(f"field {name!r} must be an integer, not {value!r}")
        if minimum is not None and value < minimum:
            raise ControlError(f"field {name!r} must be >= {minimum}, not {value}")
        return value

    def optional_int(self, name: str) -> int | None:
        return self.integer(name, minimum=0) if self.raw.get(name) is not None else None

    def flag(self, name: str) -> bool:
        value = self.raw.get(name, False)
        if not isinstance(value, bool):
            raise ControlError(f"field {name!r} must be true or false, not {value!r}")
        return value

    def recovery_action(self) -> int | None:
        """A recovery action by NVML value or by name ("gpu-reset", "node-reboot", ...)."""
        value = self.raw.get("recovery_action")
        if value is None:
            return None
        if isinstance(value, str):
            names = {recovery_label(a): int(a) for a in RecoveryAction}
            if value not in names:
                raise ControlError(f"field 'recovery_action' must be one of {', '.join(names)} or a number, "
                                   f"not {value!r}")
            return names[value]
        return self.integer("recovery_action", minimum=0)

    def gpu(self) -> int | str:
        value = self.raw.get("gpu")
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ControlError(f"field 'gpu' must be a GPU index or UUID, not {value!r}")
        return value


Handler = Callable[[ControlContext, Args], Reply | Awaitable[Reply]]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        COMMANDS[name] = handler
        return handler

    return register


@command("xid")
def _xid(ctx: ControlContext, args: Args) -> Reply:
    event = ctx.simulated().inject_xid(args.gpu(), args.integer("xid", minimum=0), args.optional_int("gi"),
                                       args.optional_int("ci"), args.recovery_action())
    where = f" GI {event.gi}" if event.gi is not None else ""
    where += f" CI {event.ci}" if event.ci is not None else ""
    if event.recovery_action is not None:
        where += f" (the driver asks for {recovery_label(event.recovery_action)})"
    return {"message": f"XID {event.xid} injected on {event.gpu}{where}", "gpu": event.gpu}


@command("hang")
def _hang(ctx: ControlContext, args: Args) -> Reply:
    """NVML calls that do not return: the probe of one GPU and/or every event wait; or release them."""
    backend = ctx.simulated()
    if args.flag("release"):
        backend.release()
        return {"message": "every hung NVML call returns"}
    gpu = args.gpu() if args.raw.get("gpu") is not None else None
    what = backend.hang(gpu, events=args.flag("events"))
    return {"message": f"{what} hang(s) until released"}


@command("dirty")
def _dirty(ctx: ControlContext, args: Args) -> Reply:
    """Compute processes and/or memory left on a GPU (GPU hygiene); `clean` removes them."""
    backend = ctx.simulated()
    if args.flag("clean"):
        uuid = backend.clean(args.gpu())
        return {"message": f"{uuid} is clean", "gpu": uuid}
    pids = args.raw.get("pids", [])
    if not isinstance(pids, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in pids):
        raise ControlError(f"field 'pids' must be a list of process IDs, not {pids!r}")
    uuid = backend.make_dirty(args.gpu(), pids, args.integer("memory_mib", default=0, minimum=0))
    return {"message": f"{uuid} has {len(pids)} compute processes and {args.raw.get('memory_mib', 0)} MiB in use",
            "gpu": uuid}


@command("lose")
def _lose(ctx: ControlContext, args: Args) -> Reply:
    uuid = ctx.simulated().lose(args.gpu())
    return {"message": f"{uuid} is lost (the next probe sees it)", "gpu": uuid}


@command("restore")
def _restore(ctx: ControlContext, args: Args) -> Reply:
    uuid = ctx.simulated().restore(args.gpu())
    return {"message": f"{uuid} is back after a reset (the next probe sees it)", "gpu": uuid}


@command("ecc")
def _ecc(ctx: ControlContext, args: Args) -> Reply:
    uuid = ctx.simulated().raise_ecc(
        args.gpu(),
        count=args.integer("count", default=1, minimum=0),
        remap_pending=args.flag("remap_pending"),
        remap_failed=args.flag("remap_failed"),
        retired_pending=args.flag("retired_pending"),
    )
    return {"message": f"ECC counters of {uuid} raised (the next probe sees it)", "gpu": uuid}


@command("wait-errors")
def _wait_errors(ctx: ControlContext, args: Args) -> Reply:
    count = args.integer("count", minimum=0)
    ctx.simulated().fail_waits(count)
    return {"message": f"the next {count} event waits fail"}


@command("mig-layout")
async def _mig_layout(ctx: ControlContext, args: Args) -> Reply:
    """Repartition one GPU (as mig-parted would), then let the plugin rescan unless told not to."""
    devices = args.raw.get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, str | dict) for d in devices):
        raise ControlError(f"field 'devices' must be a list of MIG profile names, not {devices!r}")
    disable = args.flag("disable")
    if disable and devices:
        raise ControlError("a GPU with MIG disabled has no MIG devices: give 'disable' or 'devices', not both")
    gpu = ctx.simulated().set_mig_layout(args.gpu(), devices, enabled=not disable)
    layout = describe_layout([gpu]).split(":", 1)[1]
    message = f"GPU {gpu.index} MIG layout: {layout}"
    if args.flag("no_rescan") or ctx.rescan is None:
        return {"message": f"{message} (the plugin sees it on its next rescan or SIGHUP)", "gpu": gpu.uuid}
    applied = await ctx.rescan()
    outcome = "the plugin serves it now" if applied else "the plugin kept its devices (no change, or see its log)"
    return {"message": f"{message}; {outcome}", "gpu": gpu.uuid, "applied": applied}


async def handle(context: ControlContext, line: bytes) -> Reply:
    """One request line -> one reply (never raises for a bad request)."""
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ControlError("a request must be a JSON object")
        name = request.get("command")
        handler = COMMANDS.get(name) if isinstance(name, str) else None
        if handler is None:
            raise ControlError(f"unknown command {name!r} (known: {', '.join(sorted(COMMANDS))})")
        result = handler(context, Args(request))
        if inspect.isawaitable(result):
            result = await result
        log.info("control request", extra={"command": name, "result": result.get("message", "")})
        return {"ok": True, **result}
    except json.JSONDecodeError as exc:
        return {"ok": False, "error": f"not JSON: {exc}"}
    except (ControlError, ValueError, PluginError) as exc:
        return {"ok": False, "error": str(exc)}


def path_problem(path: str, kubelet_socket: str = "") -> str | None:
    """Why the control socket must not be bound at `path`, None when it may (nothing there, or a
    stale socket nobody listens on)."""
    if kubelet_socket and os.path.abspath(path) == os.path.abspath(kubelet_socket):
        return f"{path} is the kubelet's socket (--kubelet-socket); pick another path"
    problem = unix_sockets.replace_problem(path)
    if problem is None and unix_sockets.is_listening(path):
        problem = f"{path} is a socket another process listens on; pick another path"
    return problem


def check_socket_path(path: str, field: str = "--simulate-control") -> None:
    """Refuse, before anything starts, a control socket path that cannot work: a directory, an
    existing file that is not a socket (it would be deleted), or a folder that does not exist."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            raise ConfigError(field, f"{path}: the folder {folder} does not exist") from None
        return
    except OSError as exc:
        raise ConfigError(field, f"{path}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(mode):
        raise ConfigError(field, f"{path} is a directory; give the path of a socket to create, e.g. {path}/nvdp.sock")
    if not stat.S_ISSOCK(mode):
        raise ConfigError(field, f"{path} exists and is not a socket (nvdp would have to delete it)")


class ControlServer:
    """Resource handling: `start()` replaces a stale socket file (ConfigError for anything else
    at the path) and listens; `close()` closes every connection and removes the socket file if
    it is still ours."""

    def __init__(self, path: str, context: ControlContext, kubelet_socket: str = "") -> None:
        self.path = path
        self.context = context
        self.kubelet_socket = kubelet_socket
        self._server: asyncio.Server | None = None
        self._identity: unix_sockets.Identity | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        problem = path_problem(self.path, self.kubelet_socket)
        if problem is not None:
            raise ConfigError(FLAG, problem)
        unix_sockets.remove_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with unix_sockets.private_umask():
                sock.bind(self.path)
            self._identity = unix_sockets.bound(self.path)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE_BYTES)
        except BaseException:
            sock.close()
            raise
        log.info("fault-injection control socket open", extra={"socket": self.path})

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
        ours, self._identity = self._identity, None
        unix_sockets.remove_if_ours(self.path, ours)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await read_line(reader):
                reply = await handle(self.context, line) if line is not TOO_LONG else TOO_LONG_REPLY
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


TOO_LONG = b"<too long>"  # what read_line returns for a line over the reader's limit
TOO_LONG_REPLY: Reply = {"ok": False, "error": f"request line longer than {MAX_LINE_BYTES} bytes "
                         "(1 MiB, the control socket's limit); nothing was done"}


async def read_line(reader: asyncio.StreamReader) -> bytes:
    """The next line (b"" at the end of the stream), or TOO_LONG for a line over the limit, whose
    rest is read and dropped so that the next request starts on a line of its own."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial  # the last line had no newline (or nothing came)
    except asyncio.LimitOverrunError:
        pass
    while True:  # drop what the reader holds, up to and including the newline
        try:
            await reader.readuntil(b"\n")
            return TOO_LONG
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
        except asyncio.IncompleteReadError:
            return TOO_LONG


def request(path: str, message: Mapping[str, Any], timeout: float = 5.0) -> Reply:
    """Blocking client: send one request, return its reply. OSError when the socket is not there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(dict(message)).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        reply = json.loads(data)
    except json.JSONDecodeError as exc:
        raise OSError(f"control socket {path} sent no valid reply: {data[:200]!r}") from exc
    if not isinstance(reply, dict):
        raise OSError(f"control socket {path} sent no valid reply: {data[:200]!r}")
    return reply
