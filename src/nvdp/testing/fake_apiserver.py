"""A small Kubernetes API server for tests and demos: HTTP/1.1 on 127.0.0.1 (optionally TLS), the
real paths and JSON shapes, kept as strict as kube-apiserver on everything it serves.

Served (core/v1 Nodes and Events built in; Pods (`PODS`) and namespaced custom types added with `add_type`):

    GET    /api/v1/nodes/<name>                         get      (404 NotFound Status when absent)
    GET    /api/v1/nodes?fieldSelector=..&labelSelector=..   list (NodeList, metadata.resourceVersion)
    GET    /api/v1/nodes?watch=1&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=S   watch
    PATCH  /api/v1/nodes/<name>[/status]                merge-patch or strategic-merge-patch
    PUT    /api/v1/nodes/<name>[/status]                update
    DELETE /api/v1/nodes/<name>
    POST   /api/v1/namespaces/<ns>/events               create (and GET/list/watch as above)
    POST/GET/PUT/PATCH/DELETE /apis/<group>/<version>/namespaces/<ns>/<plural>[/<name>]

What it keeps as the real server does (docs/testing.md lists the sources):
- resourceVersion: one counter for the whole store, bumped by every write that changes
  something (a no-op patch or update changes nothing and bumps nothing); each object carries the
  version of its last change, a list the version it was read at.
- watch: one JSON object per line, `{"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR", "object": ..}`,
  chunked. Without resourceVersion (or "0"): synthetic ADDED for what exists, then changes. From a
  version: every later change, none before. Older than the kept history (`compact`, or more than
  `history` changes ago): HTTP 200, then one ERROR event holding a 410 Status, reason Expired.
  Newer than the store: 504 with cause ResourceVersionTooLarge. An object moving into or out of a
  label selector is ADDED or DELETED for that watcher. BOOKMARKs (only with
  allowWatchBookmarks=true) carry just kind, apiVersion and metadata.resourceVersion.
- errors are `Status` objects: 400 BadRequest, 401 Unauthorized, 403 Forbidden (per-token rules),
  404 NotFound, 405 MethodNotAllowed, 409 AlreadyExists / Conflict (stale resourceVersion),
  410 Expired, 415 UnsupportedMediaType, 422 Invalid (with causes), 504 Timeout.
- nodes: writes to the main resource keep the status, writes to /status keep everything else.
- events: the involvedObject's namespace must match, and an Event about a cluster-scoped object
  (a Node) is accepted only in "default"; type must be Normal or Warning.
- custom objects: strategic merge patch is refused (415) and an update must name the
  resourceVersion it replaces (422), as for any custom resource.
Not served: other resource types (404), JSON patch and server-side apply (415),
sendInitialEvents (400), deletecollection (405), protobuf (JSON only).

Test controls: `put_node`, `label_node`, `delete`, `create`, ... change the store as a controller
would (same versions and watch events); `compact()` forgets the history; `drop_watches()` cuts
every watch stream mid-chunk; `stop()`/`start()` take the server away and bring it back on the
same port with the same store; `bookmark()` sends a bookmark now; `requests` records every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import ssl
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11

from nvdp.kube.rbac import Rule

Obj = dict[str, Any]
MAX_BODY = 3 * 1024 * 1024  # the real server's limit on a request body


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    custom: bool = False  # a CustomResourceDefinition's type (no strategic merge, updates need a version)
    status_subresource: bool = False
    merge_keys: tuple[tuple[str, str], ...] = ()  # strategic merge: (list path, its merge key)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:  # "nodes", "nodefeatures.nfd.k8s-sigs.io": how error messages name it
        return f"{self.plural}.{self.group}" if self.group else self.plural


NODES = ResourceType("", "v1", "nodes", "Node", namespaced=False, status_subresource=True,
                     merge_keys=(("status.conditions", "type"), ("status.addresses", "type")))
EVENTS = ResourceType("", "v1", "events", "Event", namespaced=True)
PODS = ResourceType("", "v1", "pods", "Pod", namespaced=True)  # not built in: tests that read a pod add it
NODE_FEATURES = ResourceType("nfd.k8s-sigs.io", "v1alpha1", "nodefeatures", "NodeFeature", namespaced=True,
                             custom=True)

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_TRUE = ("1", "t", "T", "TRUE", "true", "True")  # Go's strconv.ParseBool
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def status(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    """A metav1.Status as the API server sends it for an error."""
    body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                 "reason": reason, "code": code}
    if details is not None:
        body["details"] = details
    return body


class ApiFailure(Exception):
    def __init__(self, body: Obj) -> None:
        super().__init__(body["message"])
        self.body = body

    @property
    def code(self) -> int:
        return int(self.body["code"])


def _fail(code: int, reason: str, message: str, details: Obj | None = None) -> ApiFailure:
    return ApiFailure(status(code, reason, message, details))


def not_found(rt: ResourceType, name: str) -> ApiFailure:
    return _fail(404, "NotFound", f'{rt.qualified} "{name}" not found', _details(rt, name))


def _details(rt: ResourceType, name: str) -> Obj:
    return {"name": name, "group": rt.group, "kind": rt.plural} if rt.group else {"name": name, "kind": rt.plural}


def invalid(rt: ResourceType, name: str, causes: list[tuple[str, str, str]]) -> ApiFailure:
    """422: causes are (field, reason, message), e.g. ("metadata.name", "FieldValueRequired", "Required value")."""
    text = ", ".join(f"{f}: {m}" for f, _, m in causes)
    what = f'{rt.kind}.{rt.group}' if rt.group else rt.kind
    return _fail(422, "Invalid", f'{what} "{name}" is invalid: {text}',
                 {"name": name, "group": rt.group, "kind": rt.kind,
                  "causes": [{"reason": r, "message": m, "field": f} for f, r, m in causes]})


# --- selectors -----------------------------------------------------------------------------------

Selector = Callable[[Obj], bool]
_FIELDS = {"metadata.name": ("metadata", "name"), "metadata.namespace": ("metadata", "namespace")}
_NODE_FIELDS = {"spec.unschedulable": ("spec", "unschedulable")}


def field_selector(text: str, rt: ResourceType) -> Selector:
    """`a=b,c!=d` over the fields the type supports; an unknown field is 400, as on the real server."""
    tests: list[Callable[[Obj], bool]] = []
    known = {**_FIELDS, **(_NODE_FIELDS if rt is NODES else {})}
    for term in filter(None, text.split(",")):
        match = re.fullmatch(r"([^=!]+)(==|=|!=)(.*)", term)
        if match is None:
            raise _fail(400, "BadRequest", f'invalid selector: "{text}"; can\'t understand "{term}"')
        key, op, value = match.groups()
        if key not in known:
            raise _fail(400, "BadRequest", f'"{key}" is not a known field selector: only "{", ".join(sorted(known))}"')
        path = known[key]

        def test(obj: Obj, path: tuple[str, str] = path, value: str = value, negate: bool = op == "!=") -> bool:
            found = obj.get(path[0], {}).get(path[1])
            text = "" if found is None else str(found).lower() if isinstance(found, bool) else str(found)
            return (text == value) != negate

        tests.append(test)
    return lambda obj: all(t(obj) for t in tests)


_LABEL_TERM = re.compile(
    r"\s*(!?)\s*([A-Za-z0-9./_-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9._-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*")
LabelTest = Callable[[Mapping[str, str]], bool]


def _label_test(bang: str, key: str, op: str | None, value: str | None, setop: str | None,
                values: str | None) -> LabelTest:
    if bang:
        return lambda labels: key not in labels
    if op:
        return lambda labels: (labels.get(key) == value) != (op == "!=")
    if setop:
        choices = {v.strip() for v in (values or "").split(",")}
        return lambda labels: (labels.get(key) in choices) != (setop == "notin")
    return lambda labels: key in labels


def label_selector(text: str) -> Selector:
    """`a=b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x,y)`, comma-separated (all must hold)."""
    tests: list[LabelTest] = []
    for term in _split_terms(text):
        match = _LABEL_TERM.fullmatch(term)
        if match is None or (match.group(1) and (match.group(3) or match.group(5))):
            raise _fail(400, "BadRequest", f"unable to parse requirement: {term!r}")
        tests.append(_label_test(*match.groups()))
    return lambda obj: all(t(obj.get("metadata", {}).get("labels") or {}) for t in tests)


def _split_terms(text: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    return [t for t in [*terms, current] if t.strip()]


# --- patches -------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any, merge_keys: Mapping[str, str], path: str = "") -> Any:
    """Strategic merge patch for the lists this fake knows a merge key of (others replace, as a
    list without a patchMergeKey does); `$patch: delete` removes a keyed list item, null a key."""
    if isinstance(patch, list) and path in merge_keys and isinstance(target, list):
        key = merge_keys[path]
        merged = [copy.deepcopy(item) for item in target]
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise _fail(400, "BadRequest", f"{path}: every item needs the merge key {key!r}")
            index = next((i for i, old in enumerate(merged) if old.get(key) == item[key]), None)
            if item.get("$patch") == "delete":
                if index is not None:
                    merged.pop(index)
            elif index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = strategic_merge_patch(merged[index], item, merge_keys, path)
        return merged
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = strategic_merge_patch(result.get(key), value, merge_keys, f"{path}.{key}".lstrip("."))
    return result


MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
PATCH_TYPES = ("application/json-patch+json", MERGE_PATCH, "application/apply-patch+yaml", STRATEGIC_PATCH)


# --- the store -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    version: int
    type: str  # ADDED, MODIFIED, DELETED
    rt: ResourceType
    new: Obj  # the object after the change (for DELETED: as it was last)
    old: Obj | None


@dataclass(frozen=True)
class Call:
    """One request, as an audit log would show it."""

    verb: str
    group: str
    resource: str
    namespace: str | None
    name: str
    code: int
    user: str


@dataclass(eq=False)  # one per watch request, kept in a set by identity
class _Watcher:
    rt: ResourceType
    namespace: str | None
    matches: Selector
    bookmarks: bool
    queue: asyncio.Queue[Obj | None] = field(default_factory=asyncio.Queue)
    writer: asyncio.StreamWriter | None = None

    def event_for(self, change: Change) -> Obj | None:
        if change.rt != self.rt:
            return None
        if self.namespace is not None and change.new.get("metadata", {}).get("namespace") != self.namespace:
            return None
        now = self.matches(change.new)
        before = change.old is not None and self.matches(change.old)
        if change.type == "DELETED":
            kind = "DELETED" if now else None
        elif change.type == "ADDED":
            kind = "ADDED" if now else None
        else:
            kind = {(True, True): "MODIFIED", (False, True): "ADDED", (True, False): "DELETED"}.get((before, now))
        if kind is None:
            return None
        return {"type": kind, "object": change.new}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeApiServer:
    """Resource handling: `start()` binds 127.0.0.1 (port 0: a free one, kept for restarts), `stop()`
    closes the listener and every connection; `async with` does both."""

    def __init__(self, *, history: int = 1000, tls: ssl.SSLContext | None = None, port: int = 0) -> None:
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        for rt in (NODES, EVENTS):
            self.add_type(rt)
        self._objects: dict[tuple[ResourceType, str, str], Obj] = {}
        self._version = 100  # any start; clients must treat versions as opaque anyway
        self._history: deque[Change] = deque(maxlen=history)
        self._oldest = self._version  # the oldest version a watch may start from
        self._watchers: set[_Watcher] = set()
        self._tokens: dict[str, tuple[str, tuple[Rule, ...] | None]] | None = None
        self.requests: list[Call] = []
        self.errors: list[str] = []  # the fake's own bugs (answered 500); tests assert it stays empty
        self._tls = tls
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Condition()

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", self._port, ssl=self._tls)
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """The API server goes away: the listener closes and every open connection is cut."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._connections):
            writer.transport.abort()
        if server is not None:
            await server.wait_closed()
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(None)
        # Let every connection's handler see its connection cut and finish (none left pending).
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- configuration ----------------------------------------------------------------------------

    def add_type(self, rt: ResourceType) -> None:
        self.types[(rt.group, rt.version, rt.plural)] = rt

    def require_token(self, token: str, user: str = "test", rules: Iterable[Rule] | None = None) -> None:
        """From now on every request needs a bearer token; this one is `user`, allowed `rules`
        (None: everything). Call again for more tokens."""
        if self._tokens is None:
            self._tokens = {}
        self._tokens[token] = (user, None if rules is None else tuple(rules))

    def revoke_token(self, token: str) -> None:
        if self._tokens is not None:
            self._tokens.pop(token, None)

    # --- the store, as controllers and tests change it --------------------------------------------

    @property
    def resource_version(self) -> str:
        return str(self._version)

    @property
    def watch_count(self) -> int:
        return len(self._watchers)

    def get(self, rt: ResourceType, name: str, namespace: str = "") -> Obj | None:
        found = self._objects.get((rt, namespace, name))
        return self._shown(rt, found) if found is not None else None

    def objects(self, rt: ResourceType, namespace: str | None = None) -> list[Obj]:
        return [self._shown(rt, o) for (t, ns, _), o in sorted(self._objects.items(), key=lambda kv: kv[0][1:])
                if t == rt and (namespace is None or ns == namespace)]

    def create(self, rt: ResourceType, obj: Obj, namespace: str = "") -> Obj:
        return self._create(rt, namespace, copy.deepcopy(obj))

    def put_node(self, name: str, labels: Mapping[str, str] | None = None) -> Obj:
        """Create the node, or set its labels to exactly `labels` if it exists."""
        if self.get(NODES, name) is None:
            return self._create(NODES, "", {"metadata": {"name": name, "labels": dict(labels or {})},
                                             "spec": {}, "status": {"conditions": []}})
        return self._replace_labels(name, dict(labels or {}))

    def label_node(self, name: str, key: str, value: str | None) -> Obj:
        """`kubectl label node NAME KEY=VALUE` (value None: `KEY-`)."""
        return self._patch(NODES, "", name, {"metadata": {"labels": {key: value}}}, MERGE_PATCH)

    def touch_node(self, name: str) -> Obj:
        """A status heartbeat: the node changes (new version, MODIFIED) but not its labels."""
        return self._patch(NODES, "", name, {"status": {"nvdpHeartbeat": _now() + uuid.uuid4().hex[:6]}},
                           MERGE_PATCH, subresource="status")

    def delete(self, rt: ResourceType, name: str, namespace: str = "") -> None:
        self._delete(rt, namespace, name)

    def delete_node(self, name: str) -> None:
        self._delete(NODES, "", name)

    def node(self, name: str) -> Obj:
        found = self.get(NODES, name)
        if found is None:
            raise KeyError(f"no node {name}")
        return found

    def compact(self) -> None:
        """Forget every change so far (as etcd compaction): a watch from an older version gets 410."""
        self._history.clear()
        self._oldest = self._version

    def drop_watches(self) -> None:
        """Cut every watch stream without ending it cleanly (a reset connection, a proxy timeout)."""
        for watcher in list(self._watchers):
            if watcher.writer is not None:
                watcher.writer.transport.abort()

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current version to every watch that allows bookmarks."""
        for watcher in list(self._watchers):
            if watcher.bookmarks:
                watcher.queue.put_nowait(self._bookmark(watcher.rt))

    def events_about(self, kind: str, name: str) -> list[Obj]:
        return [e for e in self.objects(EVENTS) if e.get("involvedObject", {}).get("kind") == kind
                and e["involvedObject"].get("name") == name]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until `predicate()` holds; re-checked after every request and every change."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    # --- store internals --------------------------------------------------------------------------

    def _shown(self, rt: ResourceType, obj: Obj) -> Obj:
        return {"kind": rt.kind, "apiVersion": rt.api_version, **copy.deepcopy(obj)}

    def _bump(self) -> str:
        self._version += 1
        return str(self._version)

    def _record(self, change: Change) -> None:
        if self._history.maxlen is not None and len(self._history) == self._history.maxlen:
            self._oldest = self._history[0].version
        self._history.append(change)
        for watcher in self._watchers:
            event = watcher.event_for(change)
            if event is not None:
                watcher.queue.put_nowait(event)
        self._notify()

    def _notify(self) -> None:
        async def wake() -> None:
            async with self._changed:
                self._changed.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop: nobody can be waiting
            asyncio.get_running_loop().create_task(wake())

    def _create(self, rt: ResourceType, namespace: str, body: Obj) -> Obj:
        meta = body.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _fail(400, "BadRequest", "metadata must be an object")
        if meta.get("resourceVersion"):
            raise _fail(400, "BadRequest", "resourceVersion should not be set on objects to be created")
        if rt.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise _fail(400, "BadRequest",
                            "the namespace of the provided object does not match the namespace sent on the request")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        name = meta.get("name") or ""
        self._validate(rt, name, body)
        if (rt, namespace, name) in self._objects:
            raise _fail(409, "AlreadyExists", f'{rt.qualified} "{name}" already exists', _details(rt, name))
        body.pop("kind", None)
        body.pop("apiVersion", None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=self._bump())
        if rt.custom:
            meta["generation"] = 1
        self._objects[(rt, namespace, name)] = body
        self._record(Change(self._version, "ADDED", rt, self._shown(rt, body), None))
        return self._shown(rt, body)

    def _validate(self, rt: ResourceType, name: str, body: Obj) -> None:
        causes: list[tuple[str, str, str]] = []
        if not name:
            causes.append(("metadata.name", "FieldValueRequired", "Required value: name or generateName is required"))
        elif len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            causes.append(("metadata.name", "FieldValueInvalid",
                           f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
                           "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
                           "character"))
        labels = body.get("metadata", {}).get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            causes.append(("metadata.labels", "FieldValueInvalid", "Invalid value: label values must be strings"))
        if rt is EVENTS:
            causes += _event_problems(body)
        if causes:
            raise invalid(rt, name, causes)

    def _stored(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        found = self._objects.get((rt, namespace, name))
        if found is None:
            raise not_found(rt, name)
        return found

    def _write(self, rt: ResourceType, namespace: str, name: str, new: Obj, subresource: str) -> Obj:
        """Store `new` in place of the current object, keeping what this endpoint may not change."""
        old = self._stored(rt, namespace, name)
        new.pop("kind", None)
        new.pop("apiVersion", None)
        meta = new.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise _fail(400, "BadRequest", f"the name of the object ({meta.get('name')}) does not match the name "
                        f"on the URL ({name})")
        for kept in ("uid", "creationTimestamp", "name", "namespace", "generation"):
            if kept in old["metadata"]:
                meta[kept] = old["metadata"][kept]
        if rt.status_subresource and subresource == "status":
            new = {**copy.deepcopy(old), "status": new.get("status", {})}
        elif rt.status_subresource and "status" in old:
            new["status"] = copy.deepcopy(old["status"])
        self._validate(rt, name, new)
        meta = new["metadata"]
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return self._shown(rt, old)  # a no-op write: no new version, no event
        if rt.custom and new.get("spec") != old.get("spec"):
            meta["generation"] = old["metadata"].get("generation", 1) + 1
        meta["resourceVersion"] = self._bump()
        self._objects[(rt, namespace, name)] = new
        self._record(Change(self._version, "MODIFIED", rt, self._shown(rt, new), self._shown(rt, old)))
        return self._shown(rt, new)

    def _check_version(self, rt: ResourceType, name: str, given: Any, current: str) -> None:
        if given not in (None, "") and str(given) != current:
            raise _fail(409, "Conflict", f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has '
                        "been modified; please apply your changes to the latest version and try again",
                        _details(rt, name))

    def _patch(self, rt: ResourceType, namespace: str, name: str, patch: Any, content_type: str,
               subresource: str = "") -> Obj:
        old = self._stored(rt, namespace, name)
        if not isinstance(patch, dict):
            raise _fail(400, "BadRequest", "the patch must be a JSON object")
        if content_type == STRATEGIC_PATCH and rt.custom:
            raise _fail(415, "UnsupportedMediaType",
                        f"the body of the request was in an unknown format - accepted media types include: "
                        f"application/json-patch+json, {MERGE_PATCH}, application/apply-patch+yaml")
        self._check_version(rt, name, (patch.get("metadata") or {}).get("resourceVersion"),
                            old["metadata"]["resourceVersion"])
        if content_type == MERGE_PATCH:
            new = merge_patch(copy.deepcopy(old), patch)
        else:
            new = strategic_merge_patch(copy.deepcopy(old), patch, dict(rt.merge_keys))
        return self._write(rt, namespace, name, new, subresource)

    def _update(self, rt: ResourceType, namespace: str, name: str, body: Obj, subresource: str = "") -> Obj:
        old = self._stored(rt, namespace, name)
        given = (body.get("metadata") or {}).get("resourceVersion")
        if rt.custom and not given:
            raise invalid(rt, name, [("metadata.resourceVersion", "FieldValueInvalid",
                                      "Invalid value: 0x0: must be specified for an update")])
        self._check_version(rt, name, given, old["metadata"]["resourceVersion"])
        return self._write(rt, namespace, name, copy.deepcopy(body), subresource)

    def _replace_labels(self, name: str, labels: dict[str, str]) -> Obj:
        old = self._stored(NODES, "", name)
        new = copy.deepcopy(old)
        new["metadata"]["labels"] = labels
        return self._write(NODES, "", name, new, "")

    def _delete(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        old = self._objects.pop((rt, namespace, name), None)
        if old is None:
            raise not_found(rt, name)
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = self._bump()
        self._record(Change(self._version, "DELETED", rt, self._shown(rt, gone), self._shown(rt, old)))
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "kind": rt.plural, "uid": old["metadata"]["uid"],
                            **({"group": rt.group} if rt.group else {})}}

    def _bookmark(self, rt: ResourceType) -> Obj:
        return {"type": "BOOKMARK", "object": {"kind": rt.kind, "apiVersion": rt.api_version,
                                               "metadata": {"resourceVersion": self.resource_version}}}

    # --- HTTP -------------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        self._connections.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        try:
            while True:
                request = await _read_request(conn, reader)
                if request is None:
                    return
                head, body = request
                streamed = await self._answer(conn, writer, head, body)
                if streamed or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, conn: h11.Connection, writer: asyncio.StreamWriter, head: h11.Request,
                      body: bytes) -> bool:
        """Answer one request; True when it was a watch (the connection then closes)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
        url = urlsplit(head.target.decode("latin-1"))
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        method = head.method.decode("ascii")
        call = Call(method.lower(), "", "", None, "", 0, "")
        try:
            user, rules = self._authenticate(headers.get("authorization", ""))
            route = self._route(method, url.path, query)
            call = Call(route.verb, route.rt.group, route.rt.plural, route.namespace, route.name, 200, user)
            self._authorize(user, rules, route)
            if route.verb == "watch":
                self._log(call)
                await self._watch(conn, writer, route, query)
                return True
            code, answer = self._handle(route, query, body, headers.get("content-type", "").split(";")[0].strip())
        except ApiFailure as failure:
            code, answer = failure.code, failure.body
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug in the fake: say so loudly rather than hang the client
            self.errors.append(f"{method} {url.path}: {type(exc).__name__}: {exc}")
            code, answer = 500, status(500, "InternalError", f"fake API server error: {exc}")
        self._log(Call(call.verb, call.group, call.resource, call.namespace, call.name, code, call.user))
        _send_json(conn, writer, code, answer)
        await writer.drain()
        return False

    def _log(self, call: Call) -> None:
        self.requests.append(call)
        self._notify()

    def _authenticate(self, header: str) -> tuple[str, tuple[Rule, ...] | None]:
        if self._tokens is None:
            return "anonymous", None
        scheme, _, token = header.partition(" ")
        found = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            raise _fail(401, "Unauthorized", "Unauthorized")
        return found

    def _authorize(self, user: str, rules: tuple[Rule, ...] | None, route: _Route) -> None:
        if rules is None:
            return
        rt, namespace = route.rt, route.namespace
        if any(r.allows(route.verb, rt.group, rt.plural + (f"/{route.sub}" if route.sub else ""), namespace)
               for r in rules):
            return
        what = f'{rt.plural} "{route.name}"' if route.name else rt.plural
        where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        resource = rt.plural + (f"/{route.sub}" if route.sub else "")
        raise _fail(403, "Forbidden", f'{what} is forbidden: User "{user}" cannot {route.verb} resource '
                    f'"{resource}" in API group "{rt.group}" {where}',
                    {"name": route.name, "group": rt.group, "kind": rt.plural})

    def _route(self, method: str, path: str, query: Mapping[str, str]) -> _Route:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _fail(404, "NotFound", "the server could not find the requested resource")
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        rt = self.types.get((group, version, rest[0] if rest else ""))
        if rt is None or not 1 <= len(rest) <= 3 or (namespace is not None and not rt.namespaced) or \
                (len(rest) == 3 and not (rest[2] == "status" and rt.status_subresource)):
            raise _fail(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) >= 2 else ""
        sub = rest[2] if len(rest) == 3 else ""
        if rt.namespaced and namespace is None and (name or method != "GET"):
            raise _fail(404, "NotFound", "the server could not find the requested resource")
        watch = query.get("watch", "")
        if watch and watch not in _TRUE + _FALSE:
            raise _fail(400, "BadRequest", f'invalid value for watch: "{watch}"')
        verbs = {("GET", True): "get", ("PUT", True): "update", ("PATCH", True): "patch", ("DELETE", True): "delete",
                 ("POST", False): "create", ("GET", False): "watch" if watch in _TRUE else "list"}
        verb = verbs.get((method, bool(name)))
        if verb is None or (sub and verb not in ("get", "update", "patch")):
            raise _fail(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        return _Route(verb, rt, namespace, name, sub)

    def _handle(self, route: _Route, query: Mapping[str, str], body: bytes, content_type: str) -> tuple[int, Obj]:
        rt, ns = route.rt, route.namespace or ""
        if route.verb == "get":
            self._check_read_version(query)
            return 200, self._shown(rt, self._stored(rt, ns, route.name))
        if route.verb == "list":
            self._check_read_version(query)
            matches = self._selector(route, query)
            items = [self._shown(rt, o) if rt.custom else copy.deepcopy(o) for o in self._listed(route)
                     if matches(self._shown(rt, o))]
            return 200, {"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                         "metadata": {"resourceVersion": self.resource_version}, "items": items}
        if route.verb == "delete":
            return 200, self._delete(rt, ns, route.name)
        if route.verb == "patch" and content_type not in (MERGE_PATCH, STRATEGIC_PATCH):
            raise _fail(415, "UnsupportedMediaType", "the body of the request was in an unknown format - accepted "
                        f"media types include: {', '.join(PATCH_TYPES)} (this fake serves only merge and "
                        "strategic merge patches)")
        payload = _json_body(body)
        if route.verb == "create":
            if payload.get("kind", rt.kind) != rt.kind or payload.get("apiVersion", rt.api_version) != rt.api_version:
                raise _fail(400, "BadRequest", f"the API version or kind in the data ({payload.get('apiVersion')}, "
                            f"{payload.get('kind')}) does not match the expected ({rt.api_version}, {rt.kind})")
            return 201, self._create(rt, ns, payload)
        if route.verb == "update":
            return 200, self._update(rt, ns, route.name, payload, route.sub)
        return 200, self._patch(rt, ns, route.name, payload, content_type, route.sub)

    def _listed(self, route: _Route) -> list[Obj]:
        return [o for (t, ns, _), o in sorted(self._objects.items(), key=lambda kv: kv[0][1:])
                if t == route.rt and (route.namespace is None or ns == route.namespace)]

    def _selector(self, route: _Route, query: Mapping[str, str]) -> Selector:
        by_field = field_selector(query.get("fieldSelector", ""), route.rt)
        by_label = label_selector(query.get("labelSelector", ""))
        return lambda obj: by_field(obj) and by_label(obj)

    def _parse_version(self, text: str) -> int:
        try:
            version = int(text)
            if version < 0:
                raise ValueError(text)
        except ValueError:
            raise _fail(400, "BadRequest", f'invalid resource version "{text}": must be a non-negative integer') \
                from None
        return version

    def _check_read_version(self, query: Mapping[str, str]) -> int | None:
        text = query.get("resourceVersion", "")
        if not text:
            return None
        version = self._parse_version(text)
        if version > self._version:
            raise _fail(504, "Timeout", f"Too large resource version: {version}, current: {self._version}",
                        {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                         "retryAfterSeconds": 1})
        return version

    async def _watch(self, conn: h11.Connection, writer: asyncio.StreamWriter, route: _Route,
                     query: Mapping[str, str]) -> None:
        if query.get("sendInitialEvents"):
            raise _fail(400, "BadRequest", "sendInitialEvents is not served by this fake API server")
        start = self._check_read_version(query)
        bookmarks = query.get("allowWatchBookmarks", "") in _TRUE
        timeout_text = query.get("timeoutSeconds", "")
        timeout = float(self._parse_version(timeout_text)) if timeout_text else None
        watcher = _Watcher(route.rt, route.namespace, self._selector(route, query), bookmarks, writer=writer)
        expired = start is not None and start != 0 and start < self._oldest
        if expired:  # HTTP 200, then the error as the stream's only event (as kube-apiserver)
            first: list[Obj | None] = [{"type": "ERROR", "object": status(
                410, "Expired", f"too old resource version: {start} ({self._oldest})")}, None]
        elif start is None or start == 0:  # synthetic ADDED for what exists now
            first = [{"type": "ADDED", "object": self._shown(route.rt, o)} for o in self._listed(route)
                     if watcher.matches(self._shown(route.rt, o))]
        else:  # every change after `start`, then live ones: no await in between, so no gap
            first = [e for c in self._history if c.version > start for e in [watcher.event_for(c)] if e is not None]
        for event in first:
            watcher.queue.put_nowait(event)
        if not expired:
            self._watchers.add(watcher)
        self._notify()
        writer.write(conn.send(h11.Response(status_code=200, headers=[
            ("content-type", "application/json"), ("transfer-encoding", "chunked"),
            ("cache-control", "no-cache, private")])) or b"")
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await watcher.queue.get()
                    if event is None:
                        break
                    writer.write(conn.send(h11.Data(data=json.dumps(event).encode() + b"\n")) or b"")
                    await writer.drain()
        except TimeoutError:
            pass  # timeoutSeconds: the server ends the watch cleanly
        finally:
            self._watchers.discard(watcher)
            self._notify()
        if not writer.is_closing():
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()


@dataclass(frozen=True)
class _Route:
    verb: str
    rt: ResourceType
    namespace: str | None
    name: str
    sub: str = ""


def _event_problems(body: Obj) -> list[tuple[str, str, str]]:
    """core/v1 Event validation (the rules that matter for events about nodes)."""
    problems: list[tuple[str, str, str]] = []
    involved = body.get("involvedObject")
    namespace = body.get("metadata", {}).get("namespace", "")
    if not isinstance(involved, dict) or not involved.get("kind") or not involved.get("name"):
        problems.append(("involvedObject", "FieldValueRequired", "Required value: kind and name"))
    elif not involved.get("namespace"):
        if namespace not in ("", "default"):
            problems.append(("involvedObject.namespace", "FieldValueInvalid",
                             'Invalid value: "": does not match event.namespace'))
    elif involved["namespace"] != namespace:
        problems.append(("involvedObject.namespace", "FieldValueInvalid",
                         f'Invalid value: "{involved["namespace"]}": does not match event.namespace'))
    if body.get("type") not in ("Normal", "Warning"):
        problems.append(("type", "FieldValueNotSupported",
                         f'Unsupported value: "{body.get("type", "")}": supported values: "Normal", "Warning"'))
    return problems


def _json_body(body: bytes) -> Obj:
    try:
        payload = json.loads(body or b"null")
    except ValueError as exc:
        raise _fail(400, "BadRequest", f"the body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _fail(400, "BadRequest", "the body must be a JSON object")
    return payload


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[h11.Request, bytes] | None:
    head: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise h11.RemoteProtocolError("request body too large")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, body
        else:  # ConnectionClosed (or PAUSED): no (further) request on this connection
            return None


def _send_json(conn: h11.Connection, writer: asyncio.StreamWriter, code: int, body: Obj) -> None:
    data = json.dumps(body).encode()
    writer.write(conn.send(h11.Response(status_code=code, headers=[
        ("content-type", "application/json"), ("content-length", str(len(data)))])) or b"")
    writer.write(conn.send(h11.Data(data=data)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
