"""The API permissions each nvdp component needs, as data: the chart grants exactly these
(tests/deploy compares the rendered RBAC with them) and the fake API server can enforce them
(tests run the config-manager with a token limited to them)."""

from __future__ import annotations

from dataclasses import dataclass

from nvdp.kube.events import EVENT_NAMESPACE


@dataclass(frozen=True)
class Rule:
    """Allow `verbs` on `resource` of API `group` ("" = core); `namespace` None = cluster-wide."""

    group: str
    resource: str
    verbs: frozenset[str]
    namespace: str | None = None

    def allows(self, verb: str, group: str, resource: str, namespace: str | None) -> bool:
        return (self.group == group and self.resource == resource and verb in self.verbs
                and (self.namespace is None or self.namespace == namespace))


CONFIG_MANAGER_RULES = (
    Rule("", "nodes", frozenset({"get", "list", "watch"})),  # read and follow its own node's label
    Rule("", "events", frozenset({"create"}), EVENT_NAMESPACE),  # an Event on the node for an unknown label
)

# --cluster-health (the plugin; ops/cluster.py, app/cluster_api.py)
CLUSTER_HEALTH_RULES = (
    Rule("", "events", frozenset({"create"}), EVENT_NAMESPACE),  # an Event on the node per GPU health change
    Rule("", "nodes/status", frozenset({"patch"})),  # the GPUHealthy condition
    Rule("", "nodes", frozenset({"get", "patch"})),  # the node's uid for events; --taint-on-fatal: spec.taints
)

# GPU feature discovery with the NodeFeature API (app/labels_output.py)
GFD_RULES = (
    Rule("nfd.k8s-sigs.io", "nodefeatures", frozenset({"get", "create", "update"})),  # in its namespace
    Rule("", "pods", frozenset({"get"})),  # its own pod, for the NodeFeature's owner references
)
