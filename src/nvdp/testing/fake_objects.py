"""An in-memory Kubernetes API for the NodeFeature output: namespaced custom objects and pods.

`FakeObjects` has the methods of `nvdp.app.labels_output.NodeFeatureClient` (structurally: this
module imports nothing from app/), keeps objects as the API would (a uid, a resourceVersion that
moves on every write, a create of an existing name or an update of a missing one refused), and
records every call so a test can see that nothing was sent when nothing changed.

    api = FakeObjects()
    api.add_pod("gpu-operator", daemonset_pod("gfd-x1", "gpu-feature-discovery"))
    output = NodeFeatureOutput(api, "node-1", "gpu-operator", "gfd-x1")
"""

from __future__ import annotations

import copy
import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any


class ApiError(Exception):
    """What the fake answers instead of an HTTP error: `status` is the HTTP status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass
class FakeObjects:
    objects: dict[tuple[str, str, str, str, str], dict[str, Any]] = field(default_factory=dict)
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, object name)
    fail_pods: bool = False  # reading a pod fails (e.g. RBAC without pods/get)
    closed: bool = False  # close() was called
    _versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def close(self) -> None:
        self.closed = True

    def add_pod(self, namespace: str, pod: dict[str, Any]) -> None:
        self.pods[(namespace, pod["metadata"]["name"])] = pod

    def writes(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] != "get"]

    def _stamp(self, body: dict[str, Any], uid: str | None = None) -> dict[str, Any]:
        stored = copy.deepcopy(body)
        meta = stored.setdefault("metadata", {})
        meta["uid"] = uid or str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self._versions))
        return stored

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                     name: str) -> dict[str, Any] | None:
        self.calls.append(("get", name))
        found = self.objects.get((group, version, namespace, plural, name))
        return copy.deepcopy(found) if found is not None else None

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                        body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        self.calls.append(("create", name))
        key = (group, version, namespace, plural, name)
        if key in self.objects:
            raise ApiError(409, f"{plural} {name!r} already exists")
        self.objects[key] = self._stamp(body)
        return copy.deepcopy(self.objects[key])

    def replace_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                         name: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("replace", name))
        key = (group, version, namespace, plural, name)
        current = self.objects.get(key)
        if current is None:
            raise ApiError(404, f"{plural} {name!r} not found")
        if body.get("metadata", {}).get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "the object has been modified")  # optimistic concurrency, as the API
        self.objects[key] = self._stamp(body, uid=current["metadata"]["uid"])
        return copy.deepcopy(self.objects[key])

    def get_namespaced_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", name))
        if self.fail_pods:
            raise ApiError(403, f'pods "{name}" is forbidden')
        pod = self.pods.get((namespace, name))
        return copy.deepcopy(pod) if pod is not None else None


def daemonset_pod(name: str, daemonset: str) -> dict[str, Any]:
    """A pod owned by a DaemonSet, as the API returns it."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": daemonset,
                                 "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, daemonset)),
                                 "controller": True, "blockOwnerDeletion": True}],
        },
    }
