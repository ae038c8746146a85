"""The Kubernetes API behind `ops.cluster.ClusterApi`, for --cluster-health.

Not wired yet: the API client (src/nvdp/kube/, lightkube) and the fake API server come with the
per-node configuration work (issue 18), built beside this one. Once both are on one branch, this
function builds a `ClusterApi` on that client: `post_event` POSTs `ops.cluster.event_body` to
/api/v1/namespaces/default/events, `patch_node_condition` PATCHes nodes/<name>/status with
`condition_patch` (application/strategic-merge-patch+json), and `add_taint` / `remove_taint` read
the node and write spec.taints back with `taints_with` / `taints_without` and its resourceVersion
(409 Conflict: read again). Until then --cluster-health stops the start with a clear error, and
the reporter is exercised against `nvdp.testing.fake_cluster.InMemoryCluster`.
"""

from __future__ import annotations

from nvdp.config.options import Config
from nvdp.errors import ConfigError
from nvdp.ops.cluster import ClusterApi


def open_cluster_api(cfg: Config) -> ClusterApi:
    raise ConfigError(
        "--cluster-health",
        "this build has no Kubernetes API client yet (it arrives with the per-node configuration work); "
        "run without --cluster-health (docs/health.md, 'What the cluster sees')",
    )
