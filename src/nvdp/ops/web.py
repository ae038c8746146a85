"""The operations listener: /metrics, /healthz and /readyz on `--metrics-address`.

A small asyncio server in the plugin's own event loop, so a probe answered proves the loop is
responsive, and a scrape copies the state where it lives (on the loop) before a worker thread
renders the text, the costly part, so the loop stays free for the kubelet. HTTP parsing is h11's
(a sans-I/O HTTP/1.1 library); every response closes the connection, which Prometheus and the
kubelet's probes handle fine.

Resource handling: `start()` binds (raising ListenError when it cannot), `close()` stops
accepting and closes open connections. Error handling: a malformed request gets 400, a slow one
is dropped after READ_TIMEOUT_S; an error while building a response is logged and answered 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Self

import h11
from prometheus_client.exposition import choose_encoder

from nvdp.config.load import parse_listen_address
from nvdp.errors import ListenError
from nvdp.ops.metrics import make_registry
from nvdp.ops.readiness import liveness, readiness
from nvdp.ops.view import OpsView

log = logging.getLogger("nvdp.web")  # stable name: operators filter on it

READ_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 16 * 1024
PATHS = ("/metrics", "/healthz", "/readyz")


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


class HttpListener:
    """The HTTP side: an async context manager (entering binds, ListenError when it cannot;
    leaving closes); a subclass names its `paths` and writes `answer`."""

    paths: tuple[str, ...] = ()

    def __init__(self, address: str) -> None:
        self.address = address
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        host, port = parse_listen_address(self.address)
        try:
            self._server = await asyncio.start_server(self._handle, host or None, port)
        except OSError as exc:
            raise ListenError(f"--metrics-address {self.address}: cannot listen: {exc.strerror or exc}") from exc
        log.info("serving metrics and probes", extra={"address": self.address, "port": self.port})

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for writer in list(self._open):  # a slow client must not hold up the plugin's stop
                writer.close()
            await server.wait_closed()

    async def reply(self, method: str, target: str, accept: str) -> Reply:
        path = target.split("?", 1)[0]
        if path not in self.paths:
            return Reply(404, f"not found; try {', '.join(self.paths)}\n".encode())
        if method not in ("GET", "HEAD"):
            return Reply(405, b"only GET and HEAD\n")
        return await self.answer(path, accept)

    async def answer(self, path: str, accept: str) -> Reply:
        """The reply to a GET of one of `paths`."""
        raise NotImplementedError


    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        self._open.add(writer)
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                request = await _read_request(conn, reader)
            if request is None:
                return
            headers = dict(request.headers)
            method = request.method.decode("ascii", "replace")
            try:
                reply = await self.reply(method, request.target.decode("ascii", "replace"),
                                         headers.get(b"accept", b"").decode("latin-1"))
            except Exception:
                log.exception("error while answering", extra={"path": request.target.decode("ascii", "replace")})
                reply = Reply(500, b"internal error; see the plugin's log\n")
            _send(conn, writer, reply, head=method == "HEAD")
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                _send(conn, writer, Reply(exc.error_status_hint, b"bad request\n"), head=False)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._open.discard(writer)
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(8192))  # b"" at EOF
            continue
        if isinstance(event, h11.Request):
            return event
        return None  # the client closed before sending a request


def _send(conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply, head: bool) -> None:
    headers = [
        ("content-type", reply.content_type),
        ("content-length", str(len(reply.body))),
        ("connection", "close"),
    ]
    writer.write(conn.send(h11.Response(status_code=reply.status, headers=headers)) or b"")
    if not head:
        writer.write(conn.send(h11.Data(data=reply.body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")


class OpsServer(HttpListener):
    """The plugin's /metrics, /healthz and /readyz, from its OpsView."""

    paths = PATHS

    def __init__(self, view: OpsView, address: str) -> None:
        super().__init__(address)
        self.view = view

    async def answer(self, path: str, accept: str) -> Reply:
        if path == "/metrics":
            encoder, content_type = choose_encoder(accept)
            # Copied on the loop (consistent, and the state is only touched there), rendered in a
            # thread: text encoding is most of a scrape's cost (~7 ms for 384 devices).
            state = self.view.state()
            body = await asyncio.to_thread(encoder, make_registry(lambda: state))
            return Reply(200, body, content_type)
        result = await liveness(self.view) if path == "/healthz" else readiness(self.view.state())
        return Reply(200 if result.ok else 503, result.text().encode())
