"""config-manager against the fake API server: selection, the link, signalling, the API going away.

The process to signal is a real child whose argv[0] is a name unique to the test (never the real
`nvidia-device-plugin`, which another test on the machine may be running); it counts the SIGHUPs
it gets in a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nvdp.app.config_manager import ConfigManager
from nvdp.app.procsignal import Signalled
from nvdp.config.manager import ManagerSettings
from nvdp.core.backoff import Backoff
from nvdp.errors import NodeConfigError
from nvdp.kube.client import KubeClient
from nvdp.kube.connection import Direct
from nvdp.kube.rbac import CONFIG_MANAGER_RULES
from nvdp.testing import eventually, stays_true
from nvdp.testing.configmap import write_configmap
from nvdp.testing.fake_apiserver import FakeApiServer

LABEL = "nvidia.com/device-plugin.config"
NODE = "gpu-node-1"
CONFIGS = {
    "default": "version: v1\n",
    "a": "version: v1\nflags:\n  migStrategy: none\n",
    "b": "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 2\n",
}
TOKEN = "config-manager-token"

HUP_COUNTER = """
import os, signal, sys, time
count = sys.argv[1]
def hup(*_):
    with open(count, "a") as f:
        f.write("HUP\\n")
signal.signal(signal.SIGHUP, hup)
open(count + ".ready", "w").close()
while True:
    time.sleep(3600)
"""


class HupCounter:
    """A child process named `name` (its argv[0]) that counts SIGHUPs."""

    def __init__(self, folder: Path) -> None:
        self.name = f"nvdp-test-plugin-{uuid.uuid4().hex[:8]}"
        self.count_file = folder / "hups"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONEXECUTABLE": sys.executable}
        self.process = subprocess.Popen([self.name, "-c", HUP_COUNTER, str(self.count_file)],
                                        executable=sys.executable, env=env)

    async def ready(self) -> None:
        await eventually(lambda: Path(f"{self.count_file}.ready").exists(), "the HUP counter to start")

    @property
    def hups(self) -> int:
        return len(self.count_file.read_text().splitlines()) if self.count_file.exists() else 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(autouse=True)
def every_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """Format every record (a bad `extra` key fails only when the line is really emitted)."""
    caplog.set_level(logging.DEBUG)


@pytest.fixture
def counter(tmp_path: Path) -> Iterator[HupCounter]:
    c = HupCounter(tmp_path)
    yield c
    c.stop()


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as server:
        server.require_token(TOKEN, "system:serviceaccount:nvdp:config-manager", CONFIG_MANAGER_RULES)
        yield server
        assert server.errors == []
        # The config-manager needs nothing the chart does not grant (the token holds only those rules).
        assert [c for c in server.requests if c.code == 403] == []


@pytest.fixture
async def client(api: FakeApiServer) -> AsyncIterator[KubeClient]:
    async with KubeClient(Direct(api.url, TOKEN)) as c:
        yield c


@pytest.fixture
def settings(tmp_path: Path, counter: HupCounter) -> ManagerSettings:
    write_configmap(str(tmp_path / "available-configs"), CONFIGS)
    (tmp_path / "config").mkdir()
    return ManagerSettings(node_name=NODE, srcdir=str(tmp_path / "available-configs"),
                           dst=str(tmp_path / "config" / "config.yaml"), fallbacks=("named", "single"),
                           process_to_signal=counter.name)


FAST = Backoff(0.02, 0.2)


def target(settings: ManagerSettings) -> str:
    """The config name the link points at ("" for /dev/null)."""
    link = os.readlink(settings.dst)
    return "" if link == "/dev/null" else os.path.basename(link)


@contextlib.asynccontextmanager
async def sidecar(manager: ConfigManager) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(manager.follow())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- ONESHOT (the init container) ------------------------------------------------------------------


async def test_oneshot_applies_the_label_before_the_plugin_starts(api: FakeApiServer, client: KubeClient,
                                                                   settings: ManagerSettings) -> None:
    api.put_node(NODE, {LABEL: "b"})
    manager = ConfigManager(replace(settings, oneshot=True, send_signal=False), client)
    await manager.run()
    assert target(settings) == "b"
    assert os.readlink(settings.dst) == os.path.join(settings.srcdir, "b")  # the key, not ..data internals
    assert manager.state.source == "label" and manager.state.config == "b"
    assert [(c.verb, c.resource) for c in api.requests] == [("get", "nodes")]  # one read, no watch


@pytest.mark.parametrize(
    ("labels", "default", "fallbacks", "expected", "why"),
    [
        pytest.param({}, "", ("named", "single"), "default", "named", id="no label: named fallback"),
        pytest.param({}, "a", ("named",), "a", "default", id="no label: DEFAULT_CONFIG"),
        pytest.param({LABEL: ""}, "", ("empty",), "", "empty", id="empty label: empty fallback"),
        pytest.param({"other": "x"}, "b", (), "b", "default", id="other labels only"),
    ],
)
async def test_oneshot_without_the_label(api: FakeApiServer, client: KubeClient, settings: ManagerSettings,
                                         labels: dict[str, str], default: str, fallbacks: tuple[str, ...],
                                         expected: str, why: str) -> None:
    api.put_node(NODE, labels)
    s = replace(settings, oneshot=True, default_config=default, fallbacks=fallbacks)  # type: ignore[arg-type]
    manager = ConfigManager(s, client)
    await manager.run()
    assert (target(s), manager.state.source) == (expected, why)


async def test_oneshot_with_an_unknown_label_starts_on_the_default_and_says_so(
        api: FakeApiServer, client: KubeClient, settings: ManagerSettings) -> None:
    api.put_node(NODE, {LABEL: "nope"})
    manager = ConfigManager(replace(settings, oneshot=True), client)
    await manager.run()
    assert target(settings) == "default"
    assert manager.state.unknown_label == "nope"
    [event] = api.events_about("Node", NODE)
    assert event["reason"] == "UnknownConfig" and event["type"] == "Warning"
    assert "'nope'" in event["message"] and event["metadata"]["namespace"] == "default"
    assert event["involvedObject"]["uid"] == api.node(NODE)["metadata"]["uid"]


async def test_oneshot_waits_for_the_api_then_uses_the_default(api: FakeApiServer, client: KubeClient,
                                                               settings: ManagerSettings) -> None:
    api.put_node(NODE, {LABEL: "b"})
    await api.stop()
    manager = ConfigManager(replace(settings, oneshot=True, api_wait_s=0.3), client, backoff=FAST)
    await manager.run()
    assert target(settings) == "default"
    assert manager.state.api_errors >= 1 and not manager.state.api_up


async def test_oneshot_keeps_an_existing_link_when_the_api_is_away(api: FakeApiServer, client: KubeClient,
                                                                   settings: ManagerSettings) -> None:
    os.symlink(os.path.join(settings.srcdir, "a"), settings.dst)
    await api.stop()
    manager = ConfigManager(replace(settings, oneshot=True, api_wait_s=0.2), client, backoff=FAST)
    await manager.run()
    assert target(settings) == "a"


async def test_oneshot_for_a_node_that_does_not_exist_uses_the_default(api: FakeApiServer, client: KubeClient,
                                                                        settings: ManagerSettings) -> None:
    manager = ConfigManager(replace(settings, oneshot=True), client)
    await manager.run()
    assert target(settings) == "default"


# --- the sidecar -----------------------------------------------------------------------------------


async def test_sidecar_after_the_init_container_sends_no_signal(api: FakeApiServer, client: KubeClient,
                                                                settings: ManagerSettings, counter: HupCounter) -> None:
    api.put_node(NODE, {LABEL: "b"})
    counter.start()
    await counter.ready()
    await ConfigManager(replace(settings, oneshot=True, send_signal=False), client).run()
    manager = ConfigManager(settings, client, backoff=FAST)
    async with sidecar(manager):
        await api.wait_for(lambda: api.watch_count == 1)
        await stays_true(lambda: counter.hups == 0 and not manager.signalled, 0.5, "no SIGHUP at start")
    assert target(settings) == "b"


async def test_the_four_label_scenarios(api: FakeApiServer, client: KubeClient, settings: ManagerSettings,
                                        counter: HupCounter) -> None:
    api.put_node(NODE, {})
    counter.start()
    await counter.ready()
    manager = ConfigManager(settings, client, backoff=FAST)
    async with sidecar(manager) as task:
        # No init container ran: linking the default (named fallback) is the first change.
        await eventually(lambda: counter.hups == 1, "the default config linked")
        assert target(settings) == "default"
        await api.wait_for(lambda: api.watch_count == 1)

        api.label_node(NODE, LABEL, "a")  # set
        await eventually(lambda: counter.hups == 2, "one SIGHUP for the label set")
        assert target(settings) == "a"

        api.label_node(NODE, LABEL, "b")  # changed
        await eventually(lambda: counter.hups == 3, "one SIGHUP for the label changed")
        assert target(settings) == "b"

        api.label_node(NODE, LABEL, "nope")  # unknown: kept, reported once, no signal
        await eventually(lambda: manager.state.unknown_label == "nope", "the unknown label noticed")
        api.touch_node(NODE)  # a heartbeat re-delivers the same unknown label
        await eventually(lambda: manager.state.label == "nope" and api.watch_count == 1, "the heartbeat seen")
        await stays_true(lambda: counter.hups == 3 and target(settings) == "b", 0.3, "the config kept")
        assert len(api.events_about("Node", NODE)) == 1  # one Event, not one per node update
        assert not task.done()  # the official sidecar exits 1 here

        api.label_node(NODE, LABEL, None)  # removed: back to the default
        await eventually(lambda: counter.hups == 4, "one SIGHUP for the label removed")
        assert target(settings) == "default" and manager.state.unknown_label == ""
    assert manager.applied == ["default", "a", "b", "default"]
    assert manager.signalled == [Signalled.SENT] * 4


async def test_heartbeats_change_nothing(api: FakeApiServer, client: KubeClient, settings: ManagerSettings,
                                         counter: HupCounter) -> None:
    api.put_node(NODE, {LABEL: "a"})
    counter.start()
    await counter.ready()
    manager = ConfigManager(settings, client, backoff=FAST)
    async with sidecar(manager):
        await eventually(lambda: counter.hups == 1, "the first link signalled")
        version = api.resource_version
        for _ in range(5):
            api.touch_node(NODE)
        assert api.resource_version != version
        await stays_true(lambda: counter.hups == 1 and manager.state.switches == 1, 0.3, "no signal for heartbeats")


async def test_a_410_relists_and_a_dropped_watch_resumes(api: FakeApiServer, client: KubeClient,
                                                         settings: ManagerSettings, counter: HupCounter) -> None:
    api.put_node(NODE, {LABEL: "a"})
    counter.start()
    await counter.ready()
    manager = ConfigManager(settings, client, backoff=FAST)
    async with sidecar(manager):
        await eventually(lambda: target_or_none(settings) == "a", "config a")
        await api.wait_for(lambda: api.watch_count == 1)
        api.drop_watches()  # cut mid-stream: resume from the last version seen
        api.label_node(NODE, LABEL, "b")  # while nobody watches: replayed from history on resume
        await eventually(lambda: target_or_none(settings) == "b", "the change made while the watch was down")
        await api.wait_for(lambda: api.watch_count == 1)
        lists_before = sum(1 for c in api.requests if c.verb == "list")
        api.drop_watches()
        api.label_node(NODE, LABEL, "a")
        api.compact()  # the change is gone from history: the resumed watch gets 410, the relist finds it
        await eventually(lambda: target_or_none(settings) == "a", "the change found by a relist")
        assert sum(1 for c in api.requests if c.verb == "list") == lists_before + 1
        await eventually(lambda: counter.hups == 3, "one SIGHUP per change")


def target_or_none(settings: ManagerSettings) -> str | None:
    return target(settings) if os.path.lexists(settings.dst) else None


async def test_the_api_server_going_away_and_coming_back(api: FakeApiServer, client: KubeClient,
                                                         settings: ManagerSettings, counter: HupCounter) -> None:
    api.put_node(NODE, {LABEL: "a"})
    counter.start()
    await counter.ready()
    manager = ConfigManager(settings, client, backoff=FAST)
    async with sidecar(manager):
        await eventually(lambda: counter.hups == 1, "config a applied")
        await api.wait_for(lambda: api.watch_count == 1)
        await api.stop()
        await eventually(lambda: manager.state.api_errors >= 2 and not manager.state.api_up, "failures counted")
        assert target(settings) == "a"  # kept while the API is away
        api.label_node(NODE, LABEL, "b")
        await api.start()
        await eventually(lambda: counter.hups == 2, "the change applied once the API is back")
        assert target(settings) == "b" and manager.state.api_up


async def test_node_deleted_falls_back_to_the_default(api: FakeApiServer, client: KubeClient,
                                                      settings: ManagerSettings, counter: HupCounter) -> None:
    api.put_node(NODE, {LABEL: "b"})
    counter.start()
    await counter.ready()
    manager = ConfigManager(settings, client, backoff=FAST)
    async with sidecar(manager):
        await eventually(lambda: counter.hups == 1, "config b applied")
        await api.wait_for(lambda: api.watch_count == 1)
        api.delete_node(NODE)
        await eventually(lambda: counter.hups == 2, "the default applied")
        assert target(settings) == "default"


async def test_no_process_to_signal_is_not_an_error(api: FakeApiServer, client: KubeClient,
                                                    settings: ManagerSettings) -> None:
    api.put_node(NODE, {LABEL: "a"})
    manager = ConfigManager(settings, client, backoff=FAST)  # the counter was never started
    async with sidecar(manager):
        await eventually(lambda: manager.signalled == [Signalled.NOT_RUNNING], "the change made, nobody signalled")
        await api.wait_for(lambda: api.watch_count == 1)
        api.label_node(NODE, LABEL, "b")
        await eventually(lambda: len(manager.signalled) == 2, "the second change")
    assert target(settings) == "b" and manager.state.signals_skipped == 2


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n"
                     "      replicas: 0\n", "invalid sharing.timeSlicing.resources.0.replicas in ",
                     id="the schema refuses it"),
        # The schema takes any string here; the plugin's loader refuses it (and would exit 2).
        pytest.param("version: v1\nflags:\n  migStrategy: dual\n", "invalid flags.migStrategy in ",
                     id="the plugin's loader refuses it"),
        pytest.param("version: v1\nflags:\n  migStrategy: mixed\nsharing:\n  mps:\n    resources:\n"
                     "    - {name: nvidia.com/gpu, replicas: 2}\n", "not supported with MPS",
                     id="the MPS rules refuse it"),
    ],
)
async def test_an_invalid_config_is_not_applied(api: FakeApiServer, client: KubeClient, settings: ManagerSettings,
                                                counter: HupCounter, text: str, fragment: str) -> None:
    write_configmap(settings.srcdir, {**CONFIGS, "broken": text})
    api.put_node(NODE, {LABEL: "a"})
    counter.start()
    await counter.ready()
    manager = ConfigManager(settings, client, backoff=FAST)
    async with sidecar(manager):
        await eventually(lambda: counter.hups == 1, "config a applied")
        await api.wait_for(lambda: api.watch_count == 1)
        api.label_node(NODE, LABEL, "broken")
        await eventually(lambda: manager.state.problem != "", "the invalid config refused")
        assert manager.state.problem.startswith("config 'broken' is not valid: "), manager.state.problem
        assert fragment in manager.state.problem
        assert target(settings) == "a" and counter.hups == 1
        [event] = api.events_about("Node", NODE)
        assert event["reason"] == "InvalidConfig"


async def test_configmap_update_of_the_same_key_is_not_a_switch(api: FakeApiServer, client: KubeClient,
                                                                settings: ManagerSettings, counter: HupCounter) -> None:
    """As the official one: the link and the key both follow ..data, so they still resolve alike."""
    api.put_node(NODE, {LABEL: "a"})
    counter.start()
    await counter.ready()
    manager = ConfigManager(settings, client, backoff=FAST)
    async with sidecar(manager):
        await eventually(lambda: counter.hups == 1, "config a applied")
        write_configmap(settings.srcdir, {**CONFIGS, "a": "version: v1\nflags:\n  migStrategy: single\n"})
        api.touch_node(NODE)
        await stays_true(lambda: counter.hups == 1, 0.3, "no switch")
    assert "single" in Path(settings.dst).read_text()  # the plugin's next reload reads the new text


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "fragment"),
    [
        pytest.param("missing", "does not exist", id="folder missing"),
        pytest.param("empty", "no configuration files available", id="folder empty"),
        pytest.param("file", "is not a directory", id="folder is a file"),
        pytest.param("dangling", "cannot be read", id="the chosen key is a dangling link"),
        pytest.param("binary", "is not UTF-8", id="the chosen file is not text"),
    ],
)
async def test_bad_config_folders_are_named(api: FakeApiServer, client: KubeClient, tmp_path: Path,
                                            settings: ManagerSettings, layout: str, fragment: str) -> None:
    folder = tmp_path / "bad"
    if layout == "empty":
        write_configmap(str(folder), {})
    elif layout == "file":
        folder.write_text("x")
    elif layout == "dangling":
        folder.mkdir()
        (folder / "default").symlink_to(folder / "gone")
    elif layout == "binary":
        folder.mkdir()
        (folder / "default").write_bytes(b"\xff\xfe\x00")
    api.put_node(NODE, {})
    manager = ConfigManager(replace(settings, srcdir=str(folder), oneshot=True), client)
    with pytest.raises(NodeConfigError) as caught:
        await manager.run()
    assert fragment in str(caught.value) and str(folder) in str(caught.value)
    assert not os.path.lexists(settings.dst)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
async def test_an_unreadable_config_is_named(api: FakeApiServer, client: KubeClient, tmp_path: Path,
                                             settings: ManagerSettings) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    (folder / "default").write_text("version: v1\n")
    (folder / "default").chmod(0)
    api.put_node(NODE, {})
    with pytest.raises(NodeConfigError, match="cannot be read"):
        await ConfigManager(replace(settings, srcdir=str(folder), oneshot=True), client).run()


@pytest.mark.parametrize("kind", ["file", "directory"])
async def test_a_destination_that_is_not_a_symlink_is_left_alone(api: FakeApiServer, client: KubeClient,
                                                                  settings: ManagerSettings, kind: str) -> None:
    dst = Path(settings.dst)
    if kind == "file":
        dst.write_text("the operator's own file\n")
    else:
        dst.mkdir()
    api.put_node(NODE, {LABEL: "a"})
    with pytest.raises(NodeConfigError, match="not a symlink") as caught:
        await ConfigManager(replace(settings, oneshot=True), client).run()
    assert settings.dst in str(caught.value)
    assert (dst.read_text() == "the operator's own file\n") if kind == "file" else dst.is_dir()


async def test_an_old_dangling_link_of_ours_is_replaced(api: FakeApiServer, client: KubeClient,
                                                        settings: ManagerSettings) -> None:
    os.symlink(os.path.join(settings.srcdir, "gone"), settings.dst)
    api.put_node(NODE, {LABEL: "a"})
    await ConfigManager(replace(settings, oneshot=True), client).run()
    assert target(settings) == "a"
