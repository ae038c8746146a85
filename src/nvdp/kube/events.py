"""Kubernetes Events about a Node (core/v1), as `kubectl describe node` shows them.

A Node is cluster-scoped, and the API accepts an Event whose involvedObject has no namespace only
in the namespace "default" (what the kubelet does too), so that is where they go.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

EVENT_NAMESPACE = "default"


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_event(node: str, uid: str, reason: str, message: str, component: str, *, warning: bool = True,
               now: datetime | None = None) -> dict[str, Any]:
    """The body of a new Event about `node` (count 1; a unique name, as each POST creates one)."""
    stamp = rfc3339(now or datetime.now(UTC))
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{node}.{uuid.uuid4().hex[:16]}", "namespace": EVENT_NAMESPACE},
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid or node},
        "reason": reason,
        "message": message,
        "type": "Warning" if warning else "Normal",
        "source": {"component": component, "host": node},
        "reportingComponent": component,
        "reportingInstance": node,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
