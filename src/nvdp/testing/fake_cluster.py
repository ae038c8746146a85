"""An in-memory Kubernetes for `ops.cluster.ClusterApi`: one Node (status.conditions, spec.taints)
and the Events posted about it, changed the way the API server changes them.

It builds what a real client sends with the same helpers (`event_body`, `condition_patch`,
`taints_with`, `taints_without`) and applies the condition patch as a strategic merge keyed by
`type` (the node's other conditions stay), so a test sees what `kubectl describe node` would.
Calls can be made to fail (`fail_next`), as an API server that is away or forbids them would.

    cluster = InMemoryCluster("gpu-node-1")
    reporter = ClusterReporter(cluster, "gpu-node-1")
    ...
    await cluster.wait_for(lambda: cluster.condition("GPUHealthy")["status"] == "False")
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

from nvdp.ops.cluster import NodeCondition, NodeEvent, Taint, condition_patch, event_body, taints_with, taints_without

Obj = dict[str, Any]


class ApiUnavailable(Exception):
    """What a failing call raises (as a client would when the API server is away)."""


class InMemoryCluster:
    def __init__(self, node: str, conditions: list[Obj] | None = None) -> None:
        kubelet_ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is ready"}
        self.node_name = node
        self.node: Obj = {"metadata": {"name": node, "uid": f"uid-{node}"},
                          "spec": {"taints": []},
                          "status": {"conditions": conditions if conditions is not None else [kubelet_ready]}}
        self.events: list[Obj] = []
        self.closed = False  # close() was called (the plugin's way out)
        self.calls: list[str] = []  # "event", "condition", "taint", in the order they took effect
        self._failures: list[tuple[str | None, Exception]] = []
        self._changed: asyncio.Condition | None = None

    # --- test controls -----------------------------------------------------------------------------

    def fail_next(self, count: int = 1, kind: str | None = None, error: Exception | None = None) -> None:
        """The next `count` calls (of `kind`: "event", "condition", "taint"; None: any) fail."""
        for _ in range(count):
            self._failures.append((kind, error or ApiUnavailable("connection refused (simulated)")))

    def heal(self) -> None:
        """No more failing calls."""
        self._failures.clear()

    def condition(self, kind: str) -> Obj | None:
        return next((c for c in self.node["status"]["conditions"] if c["type"] == kind), None)

    @property
    def taints(self) -> list[Obj]:
        return list(self.node["spec"]["taints"])

    def events_with(self, reason: str) -> list[Obj]:
        return [e for e in self.events if e["reason"] == reason]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._cond():
            await self._cond().wait_for(predicate)

    # --- ClusterApi --------------------------------------------------------------------------------

    async def close(self) -> None:
        self.closed = True

    async def post_event(self, event: NodeEvent) -> None:
        self._maybe_fail("event")
        body = event_body(event, uid=self.node["metadata"]["uid"])
        body["metadata"]["name"] = f"{body['metadata'].pop('generateName')}{len(self.events):05x}"
        await self._done("event", lambda: self.events.append(body))

    async def patch_node_condition(self, node: str, condition: NodeCondition) -> None:
        self._maybe_fail("condition")
        self._check_node(node)
        patch = condition_patch(condition)

        def merge() -> None:
            conditions = self.node["status"]["conditions"]
            for new in patch["status"]["conditions"]:  # strategic merge: the merge key is `type`
                found = next((c for c in conditions if c["type"] == new["type"]), None)
                if found is None:
                    conditions.append(copy.deepcopy(new))
                else:
                    found.update(copy.deepcopy(new))

        await self._done("condition", merge)

    async def add_taint(self, node: str, taint: Taint) -> None:
        self._maybe_fail("taint")
        self._check_node(node)
        await self._done("taint", lambda: self.node["spec"].__setitem__("taints", taints_with(self.taints, taint)))

    async def remove_taint(self, node: str, key: str) -> None:
        self._maybe_fail("taint")
        self._check_node(node)
        await self._done("taint", lambda: self.node["spec"].__setitem__("taints", taints_without(self.taints, key)))

    # --- internals ---------------------------------------------------------------------------------

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def _maybe_fail(self, kind: str) -> None:
        for i, (which, error) in enumerate(self._failures):
            if which in (None, kind):
                del self._failures[i]
                raise error

    def _check_node(self, node: str) -> None:
        if node != self.node_name:
            raise ApiUnavailable(f'nodes "{node}" not found')

    async def _done(self, kind: str, change: Callable[[], object]) -> None:
        async with self._cond():
            change()
            self.calls.append(kind)
            self._cond().notify_all()
