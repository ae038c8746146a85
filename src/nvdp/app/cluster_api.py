"""The Kubernetes API behind `ops.cluster.ClusterApi`, for --cluster-health, on `kube.KubeClient`.

- `post_event` POSTs `ops.cluster.event_body` (with the node's uid, read once) to the events of
  the "default" namespace, where a Node's events live;
- `patch_node_condition` PATCHes nodes/<name>/status with `condition_patch` as a strategic merge
  (the node's other conditions stay);
- `add_taint` / `remove_taint` read the node and write spec.taints back whole (`taints_with` /
  `taints_without`: the list has no merge key) with the read resourceVersion, so a concurrent
  change gives 409 Conflict; that is read again at once, a few times, before giving up (the
  reporter then retries with back-off).

The CLI reads the environment and passes the connection settings (`kube.connection`); this
module is imported only with --cluster-health, so the plain plugin never loads the client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nvdp.errors import KubeApiError
from nvdp.kube.client import KubeClient
from nvdp.kube.connection import ClientConfig
from nvdp.ops.cluster import NodeCondition, NodeEvent, Taint, condition_patch, event_body, taints_with, taints_without

CONFLICT_RETRIES = 3


class KubeClusterApi:
    """`ops.cluster.ClusterApi` on the Kubernetes API. Resource handling: owns its `KubeClient`
    (`close()` frees the connection pool)."""

    def __init__(self, client: KubeClient) -> None:
        self._client = client
        self._uids: dict[str, str] = {}

    async def close(self) -> None:
        await self._client.close()

    async def _uid(self, node: str) -> str:
        if node not in self._uids:
            found = await self._client.get_node(node)
            if found is None:
                raise KubeApiError(404, "NotFound", f"node {node} not found")
            self._uids[node] = found.uid
        return self._uids[node]

    async def post_event(self, event: NodeEvent) -> None:
        body = event_body(event, uid=await self._uid(event.node))
        await self._client.create_event(body["metadata"]["namespace"], body)

    async def patch_node_condition(self, node: str, condition: NodeCondition) -> None:
        await self._client.patch_node_status(node, condition_patch(condition))

    async def add_taint(self, node: str, taint: Taint) -> None:
        await self._write_taints(node, lambda taints: taints_with(taints, taint))

    async def remove_taint(self, node: str, key: str) -> None:
        await self._write_taints(node, lambda taints: taints_without(taints, key))

    async def _write_taints(self, node: str, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
        for attempt in range(CONFLICT_RETRIES):
            found = await self._client.get_node_object(node)
            if found is None:
                raise KubeApiError(404, "NotFound", f"node {node} not found")
            taints = list((found.get("spec") or {}).get("taints") or [])
            wanted = change(taints)
            if wanted == taints:
                return  # already as wanted: no write, no new resourceVersion
            version = found["metadata"]["resourceVersion"]
            try:
                await self._client.patch_node(node, {"metadata": {"resourceVersion": version},
                                                     "spec": {"taints": wanted}})
                return
            except KubeApiError as exc:
                if exc.code != 409 or attempt == CONFLICT_RETRIES - 1:
                    raise


def open_cluster_api(config: ClientConfig) -> KubeClusterApi:
    """The API for --cluster-health; KubeConfigError (a ConfigError) when the settings cannot work."""
    return KubeClusterApi(KubeClient(config))
