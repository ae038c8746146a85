"""The control socket protocol and commands, against a SimulatedBackend (no plugin)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.backends.simulated.control import COMMANDS, Args, ControlContext, ControlServer, command, handle, request
from nvdp.core.health import EventKind, HealthEvent
from nvdp.core.hygiene import GpuUsage
from nvdp.testing import eventually


@pytest.fixture
def backend() -> SimulatedBackend:
    return SimulatedBackend("dgx-h100")


def context(backend: object) -> ControlContext:
    return ControlContext(lambda: backend, lambda: None)


async def ask(backend: object, message: Any) -> dict[str, Any]:
    line = message if isinstance(message, bytes) else json.dumps(message).encode()
    return await handle(context(backend), line)


async def test_xid_reaches_the_event_waiter(backend: SimulatedBackend) -> None:
    reply = await ask(backend, {"command": "xid", "gpu": 2, "xid": 79})
    gpu = backend.node.gpus[2].uuid
    assert reply == {"ok": True, "message": f"XID 79 injected on {gpu}", "gpu": gpu}
    assert backend.watch_events(backend.node).wait(1) == HealthEvent(gpu, EventKind.XID, xid=79)


async def test_scoped_xid_by_uuid(backend: SimulatedBackend) -> None:
    gpu = backend.node.gpus[1].uuid
    reply = await ask(backend, {"command": "xid", "gpu": gpu, "xid": 94, "gi": 2, "ci": 0})
    assert reply["ok"] and reply["message"].endswith("GI 2 CI 0")
    assert backend.watch_events(backend.node).wait(1) == HealthEvent(gpu, EventKind.XID, xid=94, gi=2, ci=0)


async def test_conditions_show_in_the_probe(backend: SimulatedBackend) -> None:
    gpus = [g.uuid for g in backend.node.gpus]
    assert (await ask(backend, {"command": "lose", "gpu": 0}))["ok"]
    assert (await ask(backend, {"command": "ecc", "gpu": 1, "count": 3, "remap_pending": True}))["ok"]
    samples = backend.probe(gpus)
    assert samples[gpus[0]].lost and not samples[gpus[0]].reachable
    assert (samples[gpus[1]].volatile_uncorrected, samples[gpus[1]].remap_pending) == (3, True)
    assert (await ask(backend, {"command": "restore", "gpu": 0}))["ok"]
    assert (await ask(backend, {"command": "restore", "gpu": 1}))["ok"]
    assert all(s.reachable and s.volatile_uncorrected == 0 for s in backend.probe(gpus).values())


async def test_wait_errors(backend: SimulatedBackend) -> None:
    from nvdp.errors import EventWaitError

    assert (await ask(backend, {"command": "wait-errors", "count": 2}))["ok"]
    waiter = backend.watch_events(backend.node)
    for _ in range(2):
        with pytest.raises(EventWaitError):
            waiter.wait(0.01)
    assert waiter.wait(0.01) is None


@pytest.mark.parametrize(
    ("message", "error"),
    [
        pytest.param(b"{not json", "not JSON", id="not JSON"),
        pytest.param([1, 2], "a request must be a JSON object", id="not an object"),
        pytest.param({"command": "explode"}, "unknown command 'explode' (known: ", id="unknown command"),
        pytest.param({"command": "xid", "gpu": 0}, "missing field 'xid'", id="missing field"),
        pytest.param({"command": "xid", "gpu": 0, "xid": "79"}, "field 'xid' must be an integer", id="wrong type"),
        pytest.param({"command": "xid", "gpu": 9, "xid": 79}, "no GPU 9 on the simulated node (indexes 0-7)",
                     id="no such GPU"),
        pytest.param({"command": "xid", "gpu": 0, "xid": 79, "ci": 0}, "needs its GPU instance", id="ci without gi"),
        pytest.param({"command": "wait-errors", "count": -1}, "field 'count' must be >= 0", id="negative count"),
        pytest.param({"command": "ecc", "gpu": 0, "remap_failed": 1}, "must be true or false", id="flag type"),
    ],
)
async def test_bad_requests_get_an_error_reply(backend: SimulatedBackend, message: Any, error: str) -> None:
    reply = await ask(backend, message)
    assert reply["ok"] is False
    assert error in reply["error"]


async def test_not_a_simulated_node() -> None:
    reply = await ask(None, {"command": "lose", "gpu": 0})
    assert reply == {"ok": False, "error": "the plugin is not running on a simulated node"}


@pytest.fixture
def extra_command() -> Iterator[None]:
    @command("echo-test")
    async def _echo(ctx: ControlContext, args: Args) -> dict[str, Any]:
        return {"message": f"echo {args.integer('n')}"}

    yield
    del COMMANDS["echo-test"]


@pytest.mark.usefixtures("extra_command")
async def test_registered_commands_may_be_async(backend: SimulatedBackend) -> None:
    assert await ask(backend, {"command": "echo-test", "n": 3}) == {"ok": True, "message": "echo 3"}


async def test_socket_round_trip_and_cleanup(backend: SimulatedBackend, plugin_dir: Path) -> None:
    path = str(plugin_dir / "control.sock")
    with socket.socket(socket.AF_UNIX) as stale:  # a stale socket (nobody listens): replaced
        stale.bind(path)
    server = ControlServer(path, context(backend))
    await server.start()
    try:
        reply = await asyncio.to_thread(request, path, {"command": "lose", "gpu": 3})
        assert reply["ok"] and backend.probe([backend.node.gpus[3].uuid])[backend.node.gpus[3].uuid].lost
        # One connection can carry several requests.
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b'{"command": "restore", "gpu": 3}\n{"command": "nope"}\n')
        first, second = json.loads(await reader.readline()), json.loads(await reader.readline())
        assert first["ok"] and not second["ok"]
        # close() must not wait for a client that keeps its connection open.
    finally:
        await asyncio.wait_for(server.close(), 5)
    assert not (plugin_dir / "control.sock").exists()
    with pytest.raises(OSError):
        request(path, {"command": "lose", "gpu": 0})


async def test_xid_with_the_drivers_recovery_action(backend: SimulatedBackend) -> None:
    gpu = backend.node.gpus[2].uuid
    reply = await ask(backend, {"command": "xid", "gpu": 2, "xid": 94, "recovery_action": "gpu-reset"})
    assert reply["message"] == f"XID 94 injected on {gpu} (the driver asks for gpu-reset)"
    assert backend.watch_events(backend.node).wait(1) == HealthEvent(gpu, EventKind.XID, xid=94, recovery_action=1)
    assert backend.probe([gpu])[gpu].recovery_action == 1  # until the reset
    backend.restore(2)
    assert backend.probe([gpu])[gpu].recovery_action == 0
    bad = await ask(backend, {"command": "xid", "gpu": 2, "xid": 94, "recovery_action": "pray"})
    assert not bad["ok"] and "must be one of none, gpu-reset, node-reboot" in bad["error"]


async def test_hang_blocks_probes_and_waits_until_released(backend: SimulatedBackend) -> None:
    gpu, other = backend.node.gpus[3].uuid, backend.node.gpus[4].uuid
    reply = await ask(backend, {"command": "hang", "gpu": 3, "events": True})
    assert reply == {"ok": True, "message": f"the probe of {gpu}, every event wait hang(s) until released"}
    assert backend.probe([other])[other].reachable  # only GPU 3's probe hangs
    probe = asyncio.create_task(asyncio.to_thread(backend.probe, [gpu]))
    wait = asyncio.create_task(asyncio.to_thread(backend.watch_events(backend.node).wait, 0.01))
    await eventually(lambda: backend.hung_calls == 2, "the probe and the wait to block")
    assert not probe.done() and not wait.done()
    assert (await ask(backend, {"command": "hang", "release": True}))["ok"]
    assert (await probe)[gpu].reachable and await wait is None
    assert backend.hung_calls == 0
    assert not (await ask(backend, {"command": "hang"}))["ok"]  # say what hangs


async def test_dirty_and_clean(backend: SimulatedBackend) -> None:
    gpu = backend.node.gpus[1].uuid
    assert (await ask(backend, {"command": "dirty", "gpu": 1, "pids": [4242], "memory_mib": 2048}))["ok"]
    assert backend.usage(gpu) == GpuUsage(pids=(4242,), memory_used_bytes=2048 * 2**20)
    assert (await ask(backend, {"command": "dirty", "gpu": 1, "clean": True}))["message"] == f"{gpu} is clean"
    assert backend.usage(gpu) == GpuUsage(pids=(), memory_used_bytes=0)
    assert not (await ask(backend, {"command": "dirty", "gpu": 1, "pids": ["x"]}))["ok"]
