"""Applies device-tree snapshots to resource servers and keeps every resource registered.

`apply(tree)` is the one place where resources start, change or stop. A registration loop keeps
every served resource registered with the kubelet, retrying with bounded back-off while the
kubelet is absent or refuses, and starts over when the kubelet restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NamedTuple

from nvdp import unix_sockets
from nvdp.core.backoff import Backoff
from nvdp.core.devices import DeviceTree, Resource, diff
from nvdp.errors import RegistrationError, ServeError
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet.registration import REGISTER_TIMEOUT_S, FolderWatch, register
from nvdp.kubelet.server import ResourceServer, ServingContext
from nvdp.ops.logs import LogOnce

log = logging.getLogger("nvdp.manager")  # stable name: operators filter on it

Registrar = Callable[[str, str, str, pb.DevicePluginOptions], Awaitable[None]]
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 5.0
# Where sockets go when --kubelet-socket is empty (no registration): the kubelet's fixed folder.
DEFAULT_SOCKET_DIR = "/var/lib/kubelet/device-plugins"


@dataclass(frozen=True)
class RetryPolicy:
    """Registration timing: each Register call may take `timeout_s`; after a failure the next try
    waits `first_s`, doubling up to `max_s`. Tests shorten it; nodes keep the defaults."""

    first_s: float = BACKOFF_FIRST_S
    max_s: float = BACKOFF_MAX_S
    timeout_s: float = REGISTER_TIMEOUT_S

    def delay(self, failures: int) -> float:
        """The wait after `failures` consecutive failures (1 = the first)."""
        return Backoff(self.first_s, self.max_s).delay(failures)


class KubeletMark(NamedTuple):
    """kubelet.sock at one moment: which file it is, and how many creations of it had been seen."""

    identity: unix_sockets.Identity | None
    creations: int


ServerFactory = Callable[[Resource, ServingContext, str], ResourceServer]
TreeObserver = Callable[[DeviceTree, DeviceTree], None]


class Manager:
    """Owns the resource servers.

    Resource handling: servers are started by `apply` and stopped by `apply` (resource gone) or
    `close`. Error handling: only RegistrationError is retried; anything else propagates.
    """

    def __init__(
        self,
        kubelet_socket: str,
        context: ServingContext,
        registrar: Registrar | None = None,
        socket_dir: str | None = None,
        retry: RetryPolicy | None = None,
        server_factory: ServerFactory = ResourceServer,
        on_apply: TreeObserver | None = None,
    ) -> None:
        """`server_factory` builds each new resource's server (the plugin passes one with its
        metrics hooks); `on_apply` sees (previous tree, new tree) after every apply (metrics count
        health changes there)."""
        self.kubelet_socket = kubelet_socket
        # Sockets go next to kubelet.sock (so a test kubelet can live in any folder), and in the
        # kubelet's usual folder when there is no kubelet socket to register with.
        self.socket_dir = socket_dir or os.path.dirname(kubelet_socket) or DEFAULT_SOCKET_DIR
        self.context = context
        self.servers: dict[str, ResourceServer] = {}
        # Registered resources -> what kubelet.sock was when their Register was dialled: a
        # kubelet.sock that is not that any more (gone, another file, or created again since, as
        # the folder watch saw) means not registered.
        self._registered_with: dict[str, KubeletMark] = {}
        self._watch: FolderWatch | None = None  # while watch_folder runs
        self._kubelet_creations = 0  # kubelet.sock creations the folder watch saw
        self.registrations = 0  # successful Register calls, for metrics
        self.registration_failures = 0
        self.kubelet_restarts = 0
        self.retry = retry or RetryPolicy()
        self._register = registrar or (
            lambda sock, name, endpoint, opts: register(sock, name, endpoint, opts, timeout=self.retry.timeout_s)
        )
        self._wake = asyncio.Event()
        # apply, check_sockets and close each await server starts and stops: one at a time, so a
        # folder event never iterates the servers while a reload adds one, nor restarts a stopped one.
        self._servers_lock = asyncio.Lock()
        self._registration_failure = LogOnce()
        self._serve_failures = LogOnce()  # per resource: the last ServeError logged
        self._new_server = server_factory
        self._on_apply = on_apply

    @property
    def tree(self) -> DeviceTree:
        return {name: s.resource for name, s in self.servers.items()}

    @property
    def serve_failures(self) -> dict[str, str]:
        """Resources whose socket could not be bound (retried on folder changes), with the reason."""
        return {
            str(name): why for name, why in self._serve_failures.items() if not self.servers[str(name)].serving
        }

    @property
    def registered(self) -> set[str]:
        """The resources registered with the kubelet that listens on kubelet.sock now (as far as known)."""
        return set(self._registered_with)

    @property
    def registers(self) -> bool:
        """False with an empty --kubelet-socket: serve only; something else tells the kubelet."""
        return bool(self.kubelet_socket)

    @property
    def all_registered(self) -> bool:
        return bool(self.servers) and (not self.registers or set(self.servers) <= self.registered)

    async def apply(self, tree: DeviceTree, context: ServingContext | None = None) -> None:
        """Start servers for new resources, update changed ones, stop vanished ones."""
        async with self._servers_lock:
            await self._apply(tree, context)

    async def _apply(self, tree: DeviceTree, context: ServingContext | None) -> None:
        if context is not None:
            self.context = context
        previous = self.tree
        change = diff(previous, tree)
        for name in change.removed:
            await self.servers.pop(name).stop()
            self._registered_with.pop(name, None)
            self._serve_failures.forget(name)
            log.info("resource removed", extra={"resource": name})
        for name, server in self.servers.items():
            server.context = self.context  # settings for the next request; streams need no resend
            if name in change.updated:
                await server.update(tree[name])
        for name in change.added:
            server = self._new_server(tree[name], self.context, self.socket_dir)
            self.servers[name] = server  # kept when it cannot bind: check_sockets retries it
            try:
                await server.start()
            except ServeError as exc:
                self._log_serve_failure_once(name, str(exc))
        if change.added:
            self._wake.set()
        if self._on_apply is not None:
            self._on_apply(previous, tree)

    async def close(self) -> None:
        async with self._servers_lock:
            # Together: each stop has its own deadline, so closing takes one deadline, not one per resource.
            await asyncio.gather(*(server.stop() for server in self.servers.values()))
            self.servers.clear()
            self._registered_with.clear()

    def _kubelet_mark(self) -> KubeletMark:
        """What kubelet.sock is now: its identity (None when absent) and how many times the folder
        watch saw it created. The identity alone is not enough: a socket re-created within the
        same clock tick can get the freed inode number back and the same ctime."""
        if self._watch is not None:
            created = self._watch.created()
            if os.path.basename(self.kubelet_socket) in created or FolderWatch.OVERFLOW in created:
                self._kubelet_creations += 1
        return KubeletMark(unix_sockets.identity(self.kubelet_socket), self._kubelet_creations)

    async def check_sockets(self) -> None:
        """After a change in the folder: serve again where our socket vanished; re-register all
        when kubelet.sock was re-created (a kubelet restart)."""
        async with self._servers_lock:
            await self._check_sockets()

    async def _check_sockets(self) -> None:
        if not os.path.isdir(self.socket_dir):
            return  # the folder is gone (kubelet reinstall?); serve again once it is back
        restarted = False
        for name, server in self.servers.items():
            if not server.socket_alive():
                if server.serving:
                    log.info("socket removed or replaced, serving again", extra={"resource": name})
                self._registered_with.pop(name, None)
                try:
                    await server.restart()
                except ServeError as exc:  # retried on the next folder event or poll
                    self._log_serve_failure_once(name, str(exc))
                    continue
                self._serve_failures.forget(name)
                restarted = True
        mark = self._kubelet_mark()
        stale = [name for name, dialled in self._registered_with.items() if dialled != mark]
        if stale:  # kubelet.sock is gone or is a new file: the kubelet that knew us is gone
            log.info("kubelet restarted", extra={"socket": self.kubelet_socket,
                                                 "kubelet_sock": "gone" if mark.identity is None else "new"})
            self.kubelet_restarts += 1  # once: the registrations are forgotten, later events find none
            for name in stale:
                del self._registered_with[name]
            restarted = True
        if restarted or (mark.identity is not None and not self.all_registered):
            self._wake.set()

    async def watch_folder(self) -> None:
        if not self.registers:
            return  # no kubelet to notice restarting, nothing to register again
        self._watch = FolderWatch(self.socket_dir)
        try:
            async for _ in self._watch.changes():
                await self.check_sockets()
        finally:
            self._watch = None

    async def keep_registered(self) -> None:
        """Runs forever: register every served resource that is not registered yet."""
        if not self.registers:
            log.info("Skipping registration with the kubelet (--kubelet-socket is empty)",
                     extra={"socket_dir": self.socket_dir})
            return
        failures = 0
        while True:
            self._wake.clear()  # before the work: a wake-up set while registering is kept
            delay: float | None = None
            pending = [s for n, s in self.servers.items() if n not in self.registered and s.serving]
            for server in pending:
                dialled = self._kubelet_mark()  # before dialling: whoever answers is this kubelet or a later one
                try:
                    await self._register(
                        self.kubelet_socket, server.name, os.path.basename(server.socket_path), server.options()
                    )
                    if dialled.identity is None or self._kubelet_mark() != dialled:
                        # kubelet.sock changed while Register was in flight: the kubelet that said
                        # yes may be gone already, so this does not count; register again.
                        raise RegistrationError(f"kubelet socket {self.kubelet_socket} changed during Register")
                except RegistrationError as exc:
                    if self._registration_failure.first(str(exc)):
                        log.warning("registration failed, retrying with back-off", extra={"error": str(exc)})
                    self.registration_failures += 1
                    failures += 1
                    delay = self.retry.delay(failures)
                    break
                if self.servers.get(server.name) is not server:
                    continue  # stopped (or replaced) while Register was in flight: not registered
                self._registered_with[server.name] = dialled
                self.registrations += 1
                self._registration_failure.forget()
                failures = 0
                log.info("registered with the kubelet", extra={"resource": server.name})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def _log_serve_failure_once(self, name: str, message: str) -> None:
        if self._serve_failures.first(message, key=name):
            log.error("cannot serve; retrying on the next folder change", extra={"resource": name, "error": message})

    async def wait_registered(self, timeout: float = 10.0) -> float:
        """Wait until every resource is registered; returns the seconds waited (for the demo)."""
        start = time.monotonic()
        async with asyncio.timeout(timeout):
            while not self.all_registered:
                await asyncio.sleep(0.002)
        return time.monotonic() - start
