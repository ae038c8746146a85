"""The simulated node's control socket: fault injection from outside the process.

Protocol (kept trivial on purpose): a unix stream socket; each request is one JSON object on one
line with a "command" field and the command's arguments; each reply is one JSON object on one
line, `{"ok": true, "message": ...}` or `{"ok": false, "error": ...}`. A connection may carry any
number of requests. `nvdp simulate inject --control PATH ...` is the command-line client.

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

from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.core.mig import describe_layout
from nvdp.errors import ConfigError, PluginError

log = logging.getLogger("nvdp.simcontrol")  # stable name: operators filter on it

Reply = dict[str, Any]


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
                                       args.optional_int("ci"))
    where = f" GI {event.gi}" if event.gi is not None else ""
    where += f" CI {event.ci}" if event.ci is not None else ""
    return {"message": f"XID {event.xid} injected on {event.gpu}{where}", "gpu": event.gpu}


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
    """Resource handling: `start()` replaces a stale socket file and listens; `close()` closes
    every connection and removes the socket file."""

    def __init__(self, path: str, context: ControlContext) -> None:
        self.path = path
        self.context = context
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                reply = await handle(self.context, line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


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
