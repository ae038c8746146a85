"""kube/: connection settings (in-cluster over TLS with a rotating token, a kubeconfig file), the
client calls and `follow_node`, against the fake API server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from nvdp.core.backoff import Backoff
from nvdp.errors import KubeApiError, KubeConfigError, KubeError, KubeUnavailable
from nvdp.kube.client import NODE_FEATURE, KubeClient
from nvdp.kube.connection import Direct, InCluster, Kubeconfig, client_config, in_cluster
from nvdp.kube.events import node_event
from nvdp.kube.nodewatch import NodeState, follow_node
from nvdp.testing import eventually
from nvdp.testing.fake_apiserver import NODE_FEATURES, FakeApiServer


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=kubernetes", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-addext", "basicConstraints=critical,CA:TRUE"], check=True, capture_output=True)
    return cert, key


def service_account(folder: Path, token: str, ca: Path) -> Path:
    account = folder / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(token)
    shutil.copy(ca, account / "ca.crt")
    (account / "namespace").write_text("nvdp\n")
    return account


async def test_in_cluster_over_tls_reads_the_rotated_token(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with FakeApiServer(tls=context) as api:
        api.put_node("n1", {"k": "v"})
        api.require_token("first")
        account = service_account(tmp_path, "first", cert)
        config = in_cluster("127.0.0.1", str(api.port), str(account))
        assert config == InCluster(f"https://127.0.0.1:{api.port}", str(account / "ca.crt"), str(account / "token"),
                                   "nvdp")
        async with KubeClient(config) as client:
            node = await client.get_node("n1")
            assert node is not None and node.labels == {"k": "v"}
            # The kubelet rotates the bound token: the next request must send the new one.
            api.require_token("second")
            api.revoke_token("first")
            (account / "token").write_text("second")
            assert await client.get_node("n1") is not None
        # The old token is refused once (401); the client re-reads the file and retries, as client-go.
        assert [c.code for c in api.requests] == [200, 401, 200]


async def test_in_cluster_rejects_a_server_the_ca_did_not_sign(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    other = tmp_path / "other.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k"),
                    "-out", str(other), "-days", "1", "-subj", "/CN=other"], check=True, capture_output=True)
    async with FakeApiServer(tls=context) as api:
        api.put_node("n1", {})
        account = service_account(tmp_path, "t", other)
        async with KubeClient(in_cluster("127.0.0.1", str(api.port), str(account))) as client:
            with pytest.raises(KubeUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
                await client.get_node("n1")


@pytest.mark.parametrize(
    ("host", "port", "files", "fragment"),
    [
        pytest.param(None, None, ("token", "ca.crt"), "KUBERNETES_SERVICE_HOST", id="not in a pod"),
        pytest.param("10.0.0.1", "https", ("token", "ca.crt"), "KUBERNETES_SERVICE_PORT", id="bad port"),
        pytest.param("10.0.0.1", "443", ("ca.crt",), "/token is missing", id="no token"),
        pytest.param("10.0.0.1", "443", ("token",), "/ca.crt is missing", id="no CA"),
    ],
)
def test_in_cluster_settings_name_what_is_missing(tmp_path: Path, host: str | None, port: str | None,
                                                  files: tuple[str, ...], fragment: str) -> None:
    for name in files:
        (tmp_path / name).write_text("x")
    with pytest.raises(KubeConfigError, match=fragment):
        in_cluster(host, port, str(tmp_path))


def test_in_cluster_ipv6_and_the_namespace_default(tmp_path: Path) -> None:
    for name in ("token", "ca.crt"):
        (tmp_path / name).write_text("x")
    config = in_cluster("fd00::1", "443", str(tmp_path))
    assert config.server == "https://[fd00::1]:443" and config.namespace == "default"


def test_kubeconfig_wins_over_in_cluster(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text("apiVersion: v1\n")
    assert client_config(str(path), "10.0.0.1", "443") == Kubeconfig(str(path))
    with pytest.raises(KubeConfigError, match=r"KUBECONFIG.*is not a file"):
        client_config(str(tmp_path / "missing"), None, None)
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST"):
        client_config("", None, None)  # the official chart's KUBECONFIG="" means in-cluster


async def test_a_kubeconfig_file_for_development(tmp_path: Path) -> None:
    async with FakeApiServer() as api:
        api.put_node("n1", {})
        api.require_token("dev-token", "dev")
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "dev",
            "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
            "users": [{"name": "me", "user": {"token": "dev-token"}}],
            "contexts": [{"name": "dev", "context": {"cluster": "fake", "user": "me"}}],
        }))
        async with KubeClient(client_config(str(path), None, None)) as client:
            assert await client.get_node("n1") is not None
        assert [c.user for c in api.requests] == ["dev"]
        for broken in ("clusters: [", "apiVersion: v1\nkind: Config\ncurrent-context: nowhere\n"):
            path.write_text(broken)
            with pytest.raises(KubeConfigError, match=str(path)):
                KubeClient(Kubeconfig(str(path)))


# --- calls -----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def every_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as server:
        server.add_type(NODE_FEATURES)
        yield server
        assert server.errors == []


@pytest.fixture
async def client(api: FakeApiServer) -> AsyncIterator[KubeClient]:
    async with KubeClient(Direct(api.url)) as c:
        yield c


async def test_node_calls(api: FakeApiServer, client: KubeClient) -> None:
    assert await client.get_node("n1") is None
    assert await client.list_node("n1") == (None, api.resource_version)
    api.put_node("n1", {"a": "1"})
    patched = await client.patch_node_labels("n1", {"a": None, "b": "2"})
    assert patched.labels == {"b": "2"} and patched.resource_version == api.resource_version
    with pytest.raises(KubeApiError) as caught:
        await client.patch_node_labels("zz", {"a": "1"})
    assert caught.value.code == 404 and caught.value.reason == "NotFound"


async def test_events(api: FakeApiServer, client: KubeClient) -> None:
    api.put_node("n1", {})
    uid = api.node("n1")["metadata"]["uid"]
    stored = await client.create_event("default", node_event("n1", uid, "UnknownConfig", "no such config", "nvdp"))
    assert stored["metadata"]["resourceVersion"]
    [event] = api.events_about("Node", "n1")
    assert (event["reason"], event["type"], event["count"], event["involvedObject"]["uid"]) == (
        "UnknownConfig", "Warning", 1, uid)
    with pytest.raises(KubeApiError) as caught:  # a Node's events belong in "default"
        await client.create_event("nvdp", node_event("n1", uid, "R", "m", "nvdp"))
    assert caught.value.code == 422


async def test_custom_objects(api: FakeApiServer, client: KubeClient) -> None:
    body = {"apiVersion": NODE_FEATURE.api_version, "kind": NODE_FEATURE.kind,
            "metadata": {"name": "n1-gpu", "labels": {"nfd.node.kubernetes.io/node-name": "n1"}},
            "spec": {"labels": {"nvidia.com/gpu.count": "8"}}}
    assert await client.get_object(NODE_FEATURE, "nvdp", "n1-gpu") is None
    created = await client.create_object(NODE_FEATURE, "nvdp", body)
    assert created["metadata"]["namespace"] == "nvdp"
    changed = {**created, "spec": {"labels": {"nvidia.com/gpu.count": "4"}}}
    replaced = await client.replace_object(NODE_FEATURE, "nvdp", changed)
    assert replaced["spec"] == changed["spec"] and replaced["metadata"]["generation"] == 2
    with pytest.raises(KubeApiError) as caught:
        await client.replace_object(NODE_FEATURE, "nvdp", changed)  # the version replaced already
    assert caught.value.code == 409
    found = await client.get_object(NODE_FEATURE, "nvdp", "n1-gpu")
    assert found is not None and found["spec"] == changed["spec"]


# --- follow_node -----------------------------------------------------------------------------------


FAST = Backoff(0.02, 0.1)


class Follower:
    def __init__(self, client: KubeClient, cycle_s: float = 300.0) -> None:
        self.seen: list[NodeState] = []
        self.errors: list[KubeError] = []
        self.recovered = 0
        self._task = asyncio.create_task(self._run(client, cycle_s))

    async def _run(self, client: KubeClient, cycle_s: float) -> None:
        async for state in follow_node(client, "n1", on_error=lambda e, n: self.errors.append(e), backoff=FAST,
                                       cycle_s=cycle_s, on_recovered=self._recovered):
            self.seen.append(state)

    def _recovered(self) -> None:
        self.recovered += 1

    def labels(self) -> list[dict[str, str] | None]:
        return [None if s.node is None else dict(s.node.labels) for s in self.seen]

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def following(client: KubeClient, cycle_s: float = 300.0) -> AsyncIterator[Follower]:
    follower = Follower(client, cycle_s)
    try:
        yield follower
    finally:
        await follower.stop()


async def test_follow_lists_first_then_watches_from_the_list_version(api: FakeApiServer, client: KubeClient) -> None:
    api.put_node("n1", {"k": "1"})
    async with following(client) as f:
        await eventually(lambda: len(f.seen) == 1, "the listed state")
        assert f.seen[0].via == "list" and f.labels() == [{"k": "1"}]
        await api.wait_for(lambda: api.watch_count == 1)
        watch_call = [c for c in api.requests if c.verb == "watch"]
        assert len(watch_call) == 1
        api.label_node("n1", "k", "2")
        api.delete_node("n1")
        api.put_node("n1", {"k": "3"})
        await eventually(lambda: len(f.seen) == 4, "every change")
    assert [s.via for s in f.seen] == ["list", "MODIFIED", "DELETED", "ADDED"]
    assert f.labels() == [{"k": "1"}, {"k": "2"}, None, {"k": "3"}]


async def test_follow_resumes_a_dropped_watch_without_listing(api: FakeApiServer, client: KubeClient) -> None:
    api.put_node("n1", {})
    async with following(client) as f:
        await api.wait_for(lambda: api.watch_count == 1)
        api.drop_watches()
        api.label_node("n1", "k", "v")
        await eventually(lambda: f.labels()[-1] == {"k": "v"}, "the change made while cut off")
    assert sum(1 for c in api.requests if c.verb == "list") == 1
    assert len(f.errors) == 1 and isinstance(f.errors[0], KubeUnavailable) and f.recovered == 1


async def test_follow_relists_on_410(api: FakeApiServer, client: KubeClient) -> None:
    api.put_node("n1", {})
    async with following(client) as f:
        await api.wait_for(lambda: api.watch_count == 1)
        api.drop_watches()
        api.label_node("n1", "k", "v")
        api.compact()
        await eventually(lambda: len(f.seen) == 2, "the relisted state")
    assert [s.via for s in f.seen] == ["list", "list"] and f.labels()[-1] == {"k": "v"}
    assert [c.code for c in api.requests if c.verb == "watch"][1] == 200  # 410 came as an ERROR event


async def test_follow_waits_out_an_absent_api_server(api: FakeApiServer, client: KubeClient) -> None:
    await api.stop()
    async with following(client) as f:
        await eventually(lambda: len(f.errors) >= 3, "retries with back-off")
        assert f.seen == [] and all(isinstance(e, KubeUnavailable) for e in f.errors)
        api.put_node("n1", {"k": "v"})
        await api.start()
        await eventually(lambda: f.labels() == [{"k": "v"}], "the node once the API is back")
        assert f.recovered == 1


async def test_follow_retries_an_error_status(api: FakeApiServer, client: KubeClient) -> None:
    api.put_node("n1", {})
    api.require_token("someone-else")  # our client has no token now: 401
    async with following(client) as f:
        await eventually(lambda: len(f.errors) >= 2, "401s reported")
        assert isinstance(f.errors[0], KubeApiError) and f.errors[0].code == 401


async def test_a_watch_is_reopened_after_its_cycle(api: FakeApiServer, client: KubeClient) -> None:
    api.put_node("n1", {})
    async with following(client, cycle_s=0.1) as f:
        await eventually(lambda: sum(1 for c in api.requests if c.verb == "watch") >= 3, "watches reopened")
        api.label_node("n1", "k", "v")
        await eventually(lambda: f.labels()[-1] == {"k": "v"}, "a change after reopening")
    assert sum(1 for c in api.requests if c.verb == "list") == 1 and f.errors == []
