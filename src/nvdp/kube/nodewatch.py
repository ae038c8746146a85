"""Follow one Node: list it, then watch from the list's resourceVersion, as the API conventions say.

- The first state comes from a LIST (a consistent read), before any watch: a caller acting on the
  first answer acts on the node as it is now (the official config-manager acted before its
  informer had loaded the node).
- The watch starts at the list's resourceVersion, so no change between the two is missed, and
  resumes from the last version seen when the stream ends or breaks (BOOKMARKs move it too).
- 410 Gone (the version is older than the server keeps): list again, and report the node as found.
- The API server unreachable, or an error Status: wait (`Backoff`), then resume; the caller hears
  of each failure through `on_error` (to log it once, count it) and keeps its last state.
- A watch lasts at most `cycle_s`, then is reopened from the last version: a connection that died
  silently (no FIN, no RST) cannot hang the caller for longer than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from nvdp.core.backoff import Backoff
from nvdp.errors import KubeError, ResourceExpired
from nvdp.kube.client import KubeClient, NodeInfo, WatchEvent

log = logging.getLogger("nvdp.kube")

DEFAULT_BACKOFF = Backoff(0.2, 30.0)
CYCLE_S = 300.0


@dataclass(frozen=True)
class NodeState:
    """The node as last seen (None: it does not exist), and how we learnt it."""

    node: NodeInfo | None
    via: str  # "list" or the watch event type: "ADDED", "MODIFIED", "DELETED"


OnError = Callable[[KubeError, int], None]  # (the error, consecutive failures so far)


async def follow_node(
    client: KubeClient,
    name: str,
    on_error: OnError | None = None,
    backoff: Backoff = DEFAULT_BACKOFF,
    cycle_s: float = CYCLE_S,
    on_recovered: Callable[[], None] | None = None,
) -> AsyncIterator[NodeState]:
    """Yield the node's state now, then after every change to it; never returns (cancel it)."""
    version: str | None = None
    failures = 0
    while True:
        try:
            if version is None:
                node, version = await client.list_node(name)
                if failures and on_recovered is not None:
                    on_recovered()
                failures = 0
                yield NodeState(node, "list")
            async for event in _one_watch(client, name, version, cycle_s):
                if failures and on_recovered is not None:
                    on_recovered()
                failures = 0
                version = event.resource_version or version
                if event.type in ("ADDED", "MODIFIED"):
                    yield NodeState(event.node, event.type)
                elif event.type == "DELETED":
                    yield NodeState(None, event.type)
        except ResourceExpired as exc:
            log.info("watch expired, listing the node again", extra={"node": name, "error": str(exc)})
            version = None
        except KubeError as exc:
            failures += 1
            if on_error is not None:
                on_error(exc, failures)
            await asyncio.sleep(backoff.delay(failures))


async def _one_watch(client: KubeClient, name: str, version: str, cycle_s: float) -> AsyncIterator[WatchEvent]:
    """One watch from `version`, for at most `cycle_s` seconds (each wait bounded separately, so
    the deadline never cancels the caller's own work between events)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cycle_s
    events = client.watch_node(name, version)
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                event = await asyncio.wait_for(anext(events), left)
            except StopAsyncIteration:
                return
            except TimeoutError:
                return
            yield event
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()
