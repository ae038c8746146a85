"""The NFD NodeFeature object GPU feature discovery publishes its labels in (pure: dicts only).

As the official GFD v0.20 (upstream-behaviour.md section 8): one `nfd.k8s-sigs.io/v1alpha1`
NodeFeature per node, named `nvidia-features-for-<node>` in GFD's namespace, labelled
`nfd.node.kubernetes.io/node-name=<node>`, with the labels in `spec.labels` and empty features;
owned by GFD's DaemonSet (controller) and its Pod, so it goes away with them. nfd-master turns it
into node labels. Sending it is `app/labels_output.py`'s job, through whatever client is wired.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

GROUP = "nfd.k8s-sigs.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "NodeFeature"
PLURAL = "nodefeatures"
NAME_PREFIX = "nvidia-features-for-"
NODE_NAME_LABEL = "nfd.node.kubernetes.io/node-name"

Object = dict[str, Any]


def object_name(node_name: str) -> str:
    return NAME_PREFIX + node_name


def empty_features() -> Object:
    """NFD's NewFeatures(): no flags, attributes or instances (GFD sends labels only)."""
    return {"flags": {}, "attributes": {}, "instances": {}}


def owner_references(pod: Mapping[str, Any] | None) -> list[Object]:
    """The NodeFeature's owners: the DaemonSet that controls GFD's pod, then the pod itself.
    `pod` is the pod object as the API returns it (None: unknown, no owners)."""
    if not pod:
        return []
    meta = pod.get("metadata") or {}
    owners: list[Object] = []
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "DaemonSet" and ref.get("controller"):
            owners.append({"apiVersion": ref.get("apiVersion", "apps/v1"), "kind": "DaemonSet",
                           "name": ref["name"], "uid": ref["uid"], "controller": True})
            break
    if meta.get("name") and meta.get("uid"):
        owners.append({"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]})
    return owners


def node_feature(node_name: str, namespace: str, labels: Mapping[str, str],
                 owners: list[Object] | None = None) -> Object:
    """The NodeFeature to create for this node."""
    metadata: Object = {"name": object_name(node_name), "namespace": namespace,
                        "labels": {NODE_NAME_LABEL: node_name}}
    if owners:
        metadata["ownerReferences"] = owners
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata,
            "spec": {"features": empty_features(), "labels": dict(labels)}}


def updated(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> Object | None:
    """The existing object carrying the desired node-name label, spec and owners (its other
    metadata, resourceVersion included, kept for the update); None when nothing would change,
    so no update is sent."""
    result = copy.deepcopy(dict(existing))
    meta = result.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **desired["metadata"]["labels"]}
    if "ownerReferences" in desired["metadata"]:
        meta["ownerReferences"] = desired["metadata"]["ownerReferences"]
    result["spec"] = copy.deepcopy(desired["spec"])
    return None if result == dict(existing) else result
