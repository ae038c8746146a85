"""The Kubernetes API calls nvdp makes, on lightkube's async client (the only module importing it).

Everything above this module sees plain data (`NodeInfo`, dicts for events and custom objects)
and nvdp's own errors: lightkube's `ApiError` becomes `KubeApiError` (410 Gone: `ResourceExpired`)
and every transport error (refused, reset, timed out, a stream cut short) becomes
`KubeUnavailable`. docs/architecture.md ("Kubernetes API client") says why lightkube.

Resource handling: a `KubeClient` owns one connection pool; `close()` (or `async with`) frees it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import httpx2
import yaml
from lightkube import AsyncClient
from lightkube.config.kubeconfig import KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.core.exceptions import ApiError, ConfigError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Event, Node, Pod
from lightkube.types import PatchType, on_error_raise

from nvdp.errors import KubeApiError, KubeConfigError, KubeUnavailable, ResourceExpired
from nvdp.kube.connection import ClientConfig, Direct, InCluster, Kubeconfig

FIELD_MANAGER = "nvdp"
REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class NodeInfo:
    """What nvdp reads of a Node."""

    name: str
    uid: str
    resource_version: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WatchEvent:
    """One watch event: ADDED, MODIFIED, DELETED (node set) or BOOKMARK (only the version)."""

    type: str
    resource_version: str
    node: NodeInfo | None = None


@dataclass(frozen=True)
class CustomType:
    """A namespaced custom resource type, e.g. NodeFeature (nfd.k8s-sigs.io/v1alpha1, nodefeatures)."""

    group: str
    version: str
    kind: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


NODE_FEATURE = CustomType("nfd.k8s-sigs.io", "v1alpha1", "NodeFeature", "nodefeatures")


def _lightkube_config(config: ClientConfig) -> KubeConfig:
    if isinstance(config, InCluster):
        return KubeConfig.from_one(
            cluster=Cluster(server=config.server, certificate_auth=config.ca_file),
            user=User(token_file=config.token_file),
            namespace=config.namespace,
        )
    if isinstance(config, Direct):
        return KubeConfig.from_one(cluster=Cluster(server=config.server), user=User(token=config.token))
    assert isinstance(config, Kubeconfig)
    try:
        return KubeConfig.from_file(config.path)
    except (ConfigError, OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise KubeConfigError("KUBECONFIG", f"{config.path}: {exc}") from exc


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """lightkube and httpx errors as nvdp's (see the module docstring)."""
    try:
        yield
    except ApiError as exc:
        status = exc.status
        code = int(status.code or 0)
        reason, message = status.reason or "", status.message or str(exc)
        kind = ResourceExpired if code == 410 else KubeApiError
        raise kind(code, reason, f"{what}: {message}") from exc
    except httpx2.HTTPError as exc:  # refused, reset, TLS, timeouts, a chunked stream cut short
        raise KubeUnavailable(f"{what}: {type(exc).__name__}: {exc or 'connection closed'}") from exc


def _in_namespace(body: Mapping[str, Any], namespace: str) -> dict[str, Any]:
    """A copy of `body` with metadata.namespace set (lightkube takes the namespace from the object)."""
    return {**body, "metadata": {**body.get("metadata", {}), "namespace": namespace}}


def node_info(node: Node) -> NodeInfo:
    meta = node.metadata
    assert meta is not None
    return NodeInfo(meta.name or "", meta.uid or "", meta.resourceVersion or "", dict(meta.labels or {}))


class KubeClient:
    def __init__(self, config: ClientConfig, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.source = config.source
        try:
            self._client = AsyncClient(
                _lightkube_config(config), timeout=httpx2.Timeout(timeout_s), field_manager=FIELD_MANAGER,
                trust_env=False,  # the CLI is the only reader of the environment (no proxy variables)
            )
        except (ConfigError, KeyError, TypeError, ValueError) as exc:  # e.g. a kubeconfig without its context
            raise KubeConfigError(config.source, str(exc)) from exc
        self._custom: dict[CustomType, Any] = {}

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- nodes ------------------------------------------------------------------------------------

    async def get_node(self, name: str) -> NodeInfo | None:
        """The node, or None when it does not exist."""
        try:
            with _translated(f"get node {name}"):
                return node_info(await self._client.get(Node, name))
        except KubeApiError as exc:
            if exc.code == 404:
                return None
            raise

    async def list_node(self, name: str) -> tuple[NodeInfo | None, str]:
        """The node (None: absent) and the list's resourceVersion, where a watch starts without a gap."""
        with _translated(f"list node {name}"):
            listing = self._client.list(Node, fields={"metadata.name": name})
            nodes = [node_info(n) async for n in listing]
            return (nodes[0] if nodes else None), listing.resourceVersion

    async def watch_node(self, name: str, resource_version: str) -> AsyncGenerator[WatchEvent, None]:
        """Changes to the node after `resource_version`; raises ResourceExpired when that version
        is too old (list again), KubeUnavailable when the stream breaks."""
        with _translated(f"watch node {name}"):
            events = self._client.watch(Node, fields={"metadata.name": name}, resource_version=resource_version,
                                        on_error=on_error_raise)
            async for kind, node in events:
                info = node_info(node)
                yield WatchEvent(kind, info.resource_version, None if kind == "BOOKMARK" else info)

    async def patch_node_labels(self, name: str, labels: Mapping[str, str | None]) -> NodeInfo:
        """Set (a string) or remove (None) labels with a JSON merge patch."""
        with _translated(f"patch node {name}"):
            patched = await self._client.patch(Node, name, {"metadata": {"labels": dict(labels)}},
                                               patch_type=PatchType.MERGE)
            return node_info(patched)

    async def get_node_object(self, name: str) -> dict[str, Any] | None:
        """The whole Node as the API's JSON (spec.taints, metadata.resourceVersion), None when absent."""
        try:
            with _translated(f"get node {name}"):
                return dict((await self._client.get(Node, name)).to_dict())
        except KubeApiError as exc:
            if exc.code == 404:
                return None
            raise

    async def patch_node(self, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of the Node (metadata.resourceVersion in it: 409 Conflict when stale)."""
        with _translated(f"patch node {name}"):
            patched = await self._client.patch(Node, name, dict(patch), patch_type=PatchType.MERGE)
            return dict(patched.to_dict())

    async def patch_node_status(self, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A strategic merge patch of nodes/<name>/status (conditions merge by `type`: the others stay)."""
        with _translated(f"patch node {name} status"):
            patched = await self._client.patch(Node.Status, name, dict(patch), patch_type=PatchType.STRATEGIC)
            return dict(patched.to_dict())

    # --- pods -------------------------------------------------------------------------------------

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            with _translated(f"get pod {namespace}/{name}"):
                return dict((await self._client.get(Pod, name, namespace=namespace)).to_dict())
        except KubeApiError as exc:
            if exc.code == 404:
                return None
            raise

    # --- events -----------------------------------------------------------------------------------

    async def create_event(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST a core/v1 Event (see kube/events.py for the body); returns it as stored."""
        with _translated(f"create event in {namespace}"):
            event = cast(Event, Event.from_dict(_in_namespace(body, namespace)))
            created = await self._client.create(event)
            return dict(created.to_dict())

    # --- custom objects (NodeFeature and the like) ------------------------------------------------

    def _resource(self, kind: CustomType) -> Any:
        if kind not in self._custom:
            self._custom[kind] = create_namespaced_resource(kind.group, kind.version, kind.kind, kind.plural)
        return self._custom[kind]

    async def get_object(self, kind: CustomType, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            with _translated(f"get {kind.plural}.{kind.group} {namespace}/{name}"):
                found = await self._client.get(self._resource(kind), name, namespace=namespace)
                return dict(found.to_dict())
        except KubeApiError as exc:
            if exc.code == 404:
                return None
            raise

    async def create_object(self, kind: CustomType, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        name = body.get("metadata", {}).get("name", "")
        with _translated(f"create {kind.plural}.{kind.group} {namespace}/{name}"):
            resource = self._resource(kind)
            created = await self._client.create(resource.from_dict(_in_namespace(body, namespace)))
            return dict(created.to_dict())

    async def replace_object(self, kind: CustomType, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """PUT: body.metadata.resourceVersion must be the stored one (409 Conflict otherwise)."""
        name = body.get("metadata", {}).get("name", "")
        with _translated(f"update {kind.plural}.{kind.group} {namespace}/{name}"):
            resource = self._resource(kind)
            replaced = await self._client.replace(resource.from_dict(_in_namespace(body, namespace)))
            return dict(replaced.to_dict())
