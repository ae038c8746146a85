"""The fake API server against the Kubernetes API conventions, over raw HTTP (no client library).

Each test cites the rule it checks: "API concepts" is kubernetes.io/docs/reference/using-api/
api-concepts (resource versions, efficient detection of changes, watch bookmarks, 410 Gone);
"API conventions" is the community api-conventions.md (Status, HTTP codes, optimistic
concurrency); the Event rule is the core/v1 Event validation.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest

from nvdp.kube.rbac import CONFIG_MANAGER_RULES
from nvdp.testing.fake_apiserver import (
    EVENTS,
    MERGE_PATCH,
    NODE_FEATURES,
    NODES,
    STRATEGIC_PATCH,
    FakeApiServer,
)

Obj = dict[str, Any]


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(history=50) as server:
        server.add_type(NODE_FEATURES)
        yield server
        assert server.errors == []


@pytest.fixture
async def http(api: FakeApiServer) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=api.url, timeout=10) as client:
        yield client


class Watch:
    """A raw watch: the response's lines, parsed one by one."""

    def __init__(self, response: httpx2.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()

    async def next(self, timeout: float = 5.0) -> Obj:
        line = await asyncio.wait_for(anext(self.lines), timeout)
        event = json.loads(line)
        assert isinstance(event, dict)
        return event

    async def ended(self) -> bool:
        try:
            await asyncio.wait_for(anext(self.lines), 5.0)
        except StopAsyncIteration:
            return True
        return False


async def watch(http: httpx2.AsyncClient, api: FakeApiServer, query: str) -> AsyncIterator[Watch]:
    """`async for w in watch(...)`: one watch request, open for the loop's body."""
    async with http.stream("GET", f"/api/v1/nodes?watch=1&{query}") as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.headers["transfer-encoding"] == "chunked"
        yield Watch(response)


def status_of(response: httpx2.Response, code: int, reason: str) -> Obj:
    """API conventions: an error is a Status object with the HTTP code in `code` and a reason."""
    assert response.status_code == code, response.text
    body = response.json()
    assert body["kind"] == "Status" and body["apiVersion"] == "v1" and body["status"] == "Failure"
    assert body["code"] == code and body["reason"] == reason and body["message"]
    assert isinstance(body, dict)
    return body


# --- get and list ----------------------------------------------------------------------------------


async def test_get_a_node_and_a_missing_one(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    api.put_node("n1", {"zone": "a"})
    node = (await http.get("/api/v1/nodes/n1")).json()
    assert (node["kind"], node["apiVersion"], node["metadata"]["name"]) == ("Node", "v1", "n1")
    assert node["metadata"]["labels"] == {"zone": "a"} and node["metadata"]["uid"]
    body = status_of(await http.get("/api/v1/nodes/n2"), 404, "NotFound")
    assert body["message"] == 'nodes "n2" not found' and body["details"] == {"name": "n2", "kind": "nodes"}


async def test_unknown_paths_are_404(http: httpx2.AsyncClient) -> None:
    for path in ("/api/v1/pods", "/apis/apps/v1/daemonsets", "/api/v1/namespaces/x/nodes", "/healthz"):
        status_of(await http.get(path), 404, "NotFound")


async def test_list_carries_the_read_version_and_filters(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    """API concepts: a list's metadata.resourceVersion is the version it was built at; items carry
    the version of their own last change."""
    a = api.put_node("a", {"gpu": "h100"})
    api.put_node("b", {"gpu": "a100"})
    listing = (await http.get("/api/v1/nodes")).json()
    assert listing["kind"] == "NodeList" and listing["metadata"]["resourceVersion"] == api.resource_version
    assert [i["metadata"]["name"] for i in listing["items"]] == ["a", "b"]
    assert listing["items"][0]["metadata"]["resourceVersion"] == a["metadata"]["resourceVersion"]
    by_name = (await http.get("/api/v1/nodes", params={"fieldSelector": "metadata.name=b"})).json()
    assert [i["metadata"]["name"] for i in by_name["items"]] == ["b"]
    by_label = (await http.get("/api/v1/nodes", params={"labelSelector": "gpu in (h100),!missing"})).json()
    assert [i["metadata"]["name"] for i in by_label["items"]] == ["a"]
    status_of(await http.get("/api/v1/nodes", params={"fieldSelector": "spec.nope=1"}), 400, "BadRequest")


async def test_versions_are_monotonic_and_no_op_writes_bump_nothing(api: FakeApiServer,
                                                                    http: httpx2.AsyncClient) -> None:
    v1 = int(api.put_node("n", {})["metadata"]["resourceVersion"])
    patch = {"metadata": {"labels": {"k": "v"}}}
    headers = {"content-type": MERGE_PATCH}
    v2 = int((await http.patch("/api/v1/nodes/n", json=patch, headers=headers)).json()["metadata"]["resourceVersion"])
    again = await http.patch("/api/v1/nodes/n", json=patch, headers=headers)
    assert v2 > v1 and int(again.json()["metadata"]["resourceVersion"]) == v2


async def test_a_too_new_version_is_504(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    api.put_node("n", {})
    body = status_of(await http.get("/api/v1/nodes", params={"resourceVersion": "999999"}), 504, "Timeout")
    assert body["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"
    status_of(await http.get("/api/v1/nodes", params={"resourceVersion": "x"}), 400, "BadRequest")


# --- watch -----------------------------------------------------------------------------------------


async def test_watch_without_a_version_starts_with_synthetic_added(api: FakeApiServer,
                                                                  http: httpx2.AsyncClient) -> None:
    """API concepts: "Get State and Start at Most Recent" begins with ADDED for what exists."""
    api.put_node("n1", {})
    async for w in watch(http, api, "fieldSelector=metadata.name%3Dn1"):
        first = await w.next()
        assert first["type"] == "ADDED" and first["object"]["metadata"]["name"] == "n1"
        await api.wait_for(lambda: api.watch_count == 1)
        api.label_node("n1", "k", "v")
        changed = await w.next()
        assert changed["type"] == "MODIFIED" and changed["object"]["metadata"]["labels"] == {"k": "v"}
        assert changed["object"]["kind"] == "Node"


async def test_watch_from_a_version_replays_only_later_changes(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    """API concepts: "Start at Exact" sends every change after the version, no synthetic ADDED."""
    api.put_node("n1", {})
    start = api.resource_version
    api.label_node("n1", "a", "1")
    api.label_node("n1", "b", "2")
    api.put_node("other", {})  # filtered out by the field selector
    async for w in watch(http, api, f"resourceVersion={start}&fieldSelector=metadata.name%3Dn1"):
        one, two = await w.next(), await w.next()
        assert [one["type"], two["type"]] == ["MODIFIED", "MODIFIED"]
        assert int(one["object"]["metadata"]["resourceVersion"]) < int(two["object"]["metadata"]["resourceVersion"])
        assert two["object"]["metadata"]["labels"] == {"a": "1", "b": "2"}
        await api.wait_for(lambda: api.watch_count == 1)
        api.delete_node("n1")
        gone = await w.next()
        assert gone["type"] == "DELETED" and gone["object"]["metadata"]["name"] == "n1"


async def test_a_too_old_version_is_an_error_event_with_410(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    """API concepts: a version older than the server keeps gets 410 Gone; on a watch, kube-apiserver
    answers 200 and sends it as an ERROR event holding a Status with reason Expired."""
    api.put_node("n1", {})
    old = api.resource_version
    api.label_node("n1", "k", "v")
    api.compact()
    async for w in watch(http, api, f"resourceVersion={old}"):
        error = await w.next()
        assert error["type"] == "ERROR"
        body = error["object"]
        assert (body["kind"], body["code"], body["reason"]) == ("Status", 410, "Expired")
        assert await w.ended()


async def test_history_is_bounded(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    api.put_node("n1", {})
    old = api.resource_version
    for i in range(60):  # more than history=50
        api.label_node("n1", "i", str(i))
    async for w in watch(http, api, f"resourceVersion={old}"):
        assert (await w.next())["object"]["code"] == 410


async def test_label_selector_watch_sees_objects_enter_and_leave(api: FakeApiServer,
                                                                 http: httpx2.AsyncClient) -> None:
    api.put_node("n1", {})
    async for w in watch(http, api, f"resourceVersion={api.resource_version}&labelSelector=gpu%3Dyes"):
        await api.wait_for(lambda: api.watch_count == 1)
        api.label_node("n1", "gpu", "yes")
        assert (await w.next())["type"] == "ADDED"
        api.label_node("n1", "gpu", "no")
        assert (await w.next())["type"] == "DELETED"


async def test_bookmarks_only_when_asked_and_only_the_version(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    """API concepts: BOOKMARK carries the requested kind with only metadata.resourceVersion, and only
    for a watch with allowWatchBookmarks=true."""
    api.put_node("n1", {})
    start = api.resource_version
    async with http.stream("GET", f"/api/v1/nodes?watch=true&resourceVersion={start}") as plain, \
            http.stream("GET", f"/api/v1/nodes?watch=true&resourceVersion={start}&allowWatchBookmarks=true") as marked:
        await api.wait_for(lambda: api.watch_count == 2)
        api.put_node("n2", {})  # a change every watcher sees, after the bookmark
        api.bookmark()
        api.label_node("n2", "k", "v")
        with_marks, without = Watch(marked), Watch(plain)
        assert [(await with_marks.next())["type"] for _ in range(3)] == ["ADDED", "BOOKMARK", "MODIFIED"]
        assert [(await without.next())["type"] for _ in range(2)] == ["ADDED", "MODIFIED"]
    before = api.watch_count  # the two above may still count until the server next writes to them
    async with http.stream("GET", f"/api/v1/nodes?watch=1&resourceVersion={api.resource_version}"
                                  "&allowWatchBookmarks=1") as response:
        await api.wait_for(lambda: api.watch_count == before + 1)
        api.bookmark()
        event = await Watch(response).next()
        assert event == {"type": "BOOKMARK", "object": {"kind": "Node", "apiVersion": "v1",
                                                        "metadata": {"resourceVersion": api.resource_version}}}


async def test_timeout_seconds_ends_the_watch_cleanly(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    async for w in watch(http, api, f"resourceVersion={api.resource_version}&timeoutSeconds=0"):
        assert await w.ended()


async def test_a_dropped_watch_is_an_incomplete_chunked_body(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    api.put_node("n1", {})
    async for w in watch(http, api, f"resourceVersion={api.resource_version}"):
        await api.wait_for(lambda: api.watch_count == 1)
        api.drop_watches()
        with pytest.raises(httpx2.RemoteProtocolError):
            await w.next()


async def test_stop_and_start_keep_the_port_and_the_store(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    api.put_node("n1", {"k": "v"})
    port, version = api.port, api.resource_version
    await api.stop()
    with pytest.raises(httpx2.ConnectError):
        await http.get("/api/v1/nodes/n1")
    await api.start()
    assert api.port == port
    node = (await http.get("/api/v1/nodes/n1")).json()
    assert node["metadata"]["labels"] == {"k": "v"} and api.resource_version == version


# --- patch -----------------------------------------------------------------------------------------


async def test_merge_and_strategic_merge_patches(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    api.put_node("n1", {"a": "1", "b": "2"})
    merged = await http.patch("/api/v1/nodes/n1", json={"metadata": {"labels": {"a": None, "c": "3"}}},
                              headers={"content-type": MERGE_PATCH})
    assert merged.json()["metadata"]["labels"] == {"b": "2", "c": "3"}
    conditions = {"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "GpuHealthy",
                                                                                   "status": "True"}]}}
    await http.patch("/api/v1/nodes/n1/status", json=conditions, headers={"content-type": STRATEGIC_PATCH})
    update = {"status": {"conditions": [{"type": "GpuHealthy", "status": "False", "reason": "XID"}]}}
    node = (await http.patch("/api/v1/nodes/n1/status", json=update,
                             headers={"content-type": STRATEGIC_PATCH})).json()
    # strategic merge: conditions merge by their key "type"; a merge patch would have replaced the list
    assert [(c["type"], c["status"]) for c in node["status"]["conditions"]] == [("Ready", "True"),
                                                                                ("GpuHealthy", "False")]


async def test_the_main_resource_cannot_change_status_nor_status_the_rest(api: FakeApiServer,
                                                                          http: httpx2.AsyncClient) -> None:
    api.put_node("n1", {})
    headers = {"content-type": MERGE_PATCH}
    node = (await http.patch("/api/v1/nodes/n1", json={"status": {"x": 1}}, headers=headers)).json()
    assert "x" not in node["status"]
    node = (await http.patch("/api/v1/nodes/n1/status", json={"metadata": {"labels": {"k": "v"}},
                                                              "status": {"x": 1}}, headers=headers)).json()
    assert node["status"]["x"] == 1 and not node["metadata"].get("labels")


async def test_patch_errors(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    api.put_node("n1", {})
    status_of(await http.patch("/api/v1/nodes/n1", json=[{"op": "add"}],
                               headers={"content-type": "application/json-patch+json"}), 415, "UnsupportedMediaType")
    status_of(await http.patch("/api/v1/nodes/n1", content=b"{", headers={"content-type": MERGE_PATCH}),
              400, "BadRequest")
    status_of(await http.patch("/api/v1/nodes/zz", json={}, headers={"content-type": MERGE_PATCH}), 404, "NotFound")
    stale = {"metadata": {"resourceVersion": "1", "labels": {"k": "v"}}}
    status_of(await http.patch("/api/v1/nodes/n1", json=stale, headers={"content-type": MERGE_PATCH}),
              409, "Conflict")
    status_of(await http.patch("/api/v1/nodes/n1", json={"metadata": {"labels": {"k": 1}}},
                               headers={"content-type": MERGE_PATCH}), 422, "Invalid")


# --- events ----------------------------------------------------------------------------------------


def an_event(name: str, namespace: str = "default", **extra: Any) -> Obj:
    return {"apiVersion": "v1", "kind": "Event", "metadata": {"name": name, "namespace": namespace},
            "involvedObject": {"kind": "Node", "name": "n1", "apiVersion": "v1"}, "reason": "R", "message": "m",
            "type": "Warning", **extra}


async def test_create_an_event_then_again(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    created = await http.post("/api/v1/namespaces/default/events", json=an_event("e1"))
    assert created.status_code == 201
    meta = created.json()["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"] and meta["namespace"] == "default"
    body = status_of(await http.post("/api/v1/namespaces/default/events", json=an_event("e1")), 409, "AlreadyExists")
    assert body["message"] == 'events "e1" already exists'
    assert [e["metadata"]["name"] for e in api.events_about("Node", "n1")] == ["e1"]
    generated = await http.post("/api/v1/namespaces/default/events",
                                json={**an_event(""), "metadata": {"generateName": "n1."}})
    assert generated.json()["metadata"]["name"].startswith("n1.")


@pytest.mark.parametrize(
    ("path", "event", "code", "reason", "field"),
    [
        pytest.param("/api/v1/namespaces/nvdp/events", an_event("e", "nvdp"), 422, "Invalid",
                     "involvedObject.namespace", id="a node event outside 'default'"),
        pytest.param("/api/v1/namespaces/default/events", an_event("e", type="Error"), 422, "Invalid", "type",
                     id="an event type other than Normal/Warning"),
        pytest.param("/api/v1/namespaces/default/events", an_event(""), 422, "Invalid", "metadata.name",
                     id="no name"),
        pytest.param("/api/v1/namespaces/default/events", an_event("Bad_Name"), 422, "Invalid", "metadata.name",
                     id="an invalid name"),
        pytest.param("/api/v1/namespaces/other/events", an_event("e"), 400, "BadRequest", None,
                     id="body namespace differs from the path"),
        pytest.param("/api/v1/events", an_event("e"), 404, "NotFound", None, id="create without a namespace"),
    ],
)
async def test_rejected_events(http: httpx2.AsyncClient, path: str, event: Obj, code: int, reason: str,
                               field: str | None) -> None:
    body = status_of(await http.post(path, json=event), code, reason)
    if field is not None:
        assert [c["field"] for c in body["details"]["causes"]] == [field]


# --- custom objects --------------------------------------------------------------------------------


async def test_custom_objects(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    path = "/apis/nfd.k8s-sigs.io/v1alpha1/namespaces/nvdp/nodefeatures"
    body = {"apiVersion": "nfd.k8s-sigs.io/v1alpha1", "kind": "NodeFeature",
            "metadata": {"name": "n1-gfd", "labels": {"nfd.node.kubernetes.io/node-name": "n1"}},
            "spec": {"labels": {"nvidia.com/gpu.count": "8"}}}
    created = (await http.post(path, json=body)).json()
    assert created["metadata"]["generation"] == 1 and created["kind"] == "NodeFeature"
    status_of(await http.post(path, json=body), 409, "AlreadyExists")
    listed = (await http.get(path)).json()
    assert listed["kind"] == "NodeFeatureList" and listed["items"][0]["kind"] == "NodeFeature"

    update = {**created, "spec": {"labels": {"nvidia.com/gpu.count": "4"}}}
    no_version = {**update, "metadata": {k: v for k, v in update["metadata"].items() if k != "resourceVersion"}}
    status_of(await http.put(f"{path}/n1-gfd", json=no_version), 422, "Invalid")
    replaced = (await http.put(f"{path}/n1-gfd", json=update)).json()
    assert replaced["metadata"]["generation"] == 2
    status_of(await http.put(f"{path}/n1-gfd", json=update), 409, "Conflict")  # the old version again
    status_of(await http.patch(f"{path}/n1-gfd", json={}, headers={"content-type": STRATEGIC_PATCH}),
              415, "UnsupportedMediaType")
    wrong = {**body, "kind": "Other"}
    status_of(await http.post(path, json=wrong), 400, "BadRequest")
    deleted = (await http.delete(f"{path}/n1-gfd")).json()
    assert deleted["status"] == "Success" and deleted["details"]["group"] == "nfd.k8s-sigs.io"
    status_of(await http.get(f"{path}/n1-gfd"), 404, "NotFound")
    assert api.objects(NODE_FEATURES) == []


# --- authentication and authorization --------------------------------------------------------------


async def test_bearer_tokens_and_rules(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    api.put_node("n1", {})
    api.require_token("good", "system:serviceaccount:nvdp:cm", CONFIG_MANAGER_RULES)
    status_of(await http.get("/api/v1/nodes/n1"), 401, "Unauthorized")
    status_of(await http.get("/api/v1/nodes/n1", headers={"authorization": "Bearer bad"}), 401, "Unauthorized")
    auth = {"authorization": "Bearer good"}
    assert (await http.get("/api/v1/nodes/n1", headers=auth)).status_code == 200
    body = status_of(await http.patch("/api/v1/nodes/n1", json={}, headers={**auth, "content-type": MERGE_PATCH}),
                     403, "Forbidden")
    assert 'cannot patch resource "nodes"' in body["message"] and "at the cluster scope" in body["message"]
    allowed = await http.post("/api/v1/namespaces/default/events", json=an_event("e1"), headers=auth)
    assert allowed.status_code == 201
    elsewhere = await http.post("/api/v1/namespaces/kube-system/events", json=an_event("e2", "kube-system"),
                                headers=auth)
    assert 'in the namespace "kube-system"' in status_of(elsewhere, 403, "Forbidden")["message"]
    assert [(c.verb, c.code) for c in api.requests[-3:]] == [("patch", 403), ("create", 201), ("create", 403)]


async def test_methods_not_served_are_405(api: FakeApiServer, http: httpx2.AsyncClient) -> None:
    status_of(await http.delete("/api/v1/nodes"), 405, "MethodNotAllowed")
    status_of(await http.post("/api/v1/nodes/n1", json={}), 405, "MethodNotAllowed")


def test_store_helpers_use_the_same_rules() -> None:
    api = FakeApiServer()
    with pytest.raises(Exception, match="already exists"):
        api.put_node("n1", {})
        api.create(NODES, {"metadata": {"name": "n1"}})
    api.create(EVENTS, an_event("e1"), "default")
    assert api.events_about("Node", "n1")[0]["metadata"]["namespace"] == "default"


async def test_the_example_in_docs_testing_runs() -> None:
    from pathlib import Path
    from textwrap import indent

    text = (Path(__file__).parents[2] / "docs" / "testing.md").read_text()
    section = text.split("# Testing against a fake Kubernetes API server", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    imports = "\n".join(line for line in code.splitlines() if line.startswith("from "))
    body = "\n".join(line for line in code.splitlines() if not line.startswith("from "))
    namespace: dict[str, Any] = {}
    exec(f"{imports}\nasync def example():\n{indent(body, '    ')}\n", namespace)  # the page's own example
    await namespace["example"]()
