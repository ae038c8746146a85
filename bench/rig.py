"""The bench rig: a fake kubelet in a fresh temporary folder and the plugin as a real child process."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from nvdp.core.resources import GPU_RESOURCE
from nvdp.testing import FakeKubelet
from nvdp.testing.fake_kubelet import Event
from nvdp.testing.process import PluginProcess

SIMULATED = ("--simulate", "dgx-h100")
DGX_GPUS = 8
START_TIMEOUT_S = 60.0  # generous: a loaded 2-core CI machine can take seconds to import grpc


@dataclass
class Rig:
    folder: str
    kubelet: FakeKubelet
    plugin: PluginProcess


@asynccontextmanager
async def kubelet_folder() -> AsyncIterator[tuple[str, FakeKubelet]]:
    with tempfile.TemporaryDirectory(prefix="nvdp-bench-") as folder:
        async with FakeKubelet(folder) as kubelet:
            yield folder, kubelet


@asynccontextmanager
async def running_plugin(
    args: Sequence[str] = SIMULATED, resource: str = GPU_RESOURCE, min_devices: int = DGX_GPUS
) -> AsyncIterator[Rig]:
    """A registered plugin child process whose device list the fake kubelet holds."""
    async with kubelet_folder() as (folder, kubelet):
        plugin = PluginProcess(folder, args)
        async with plugin:
            await kubelet.wait_registered(resource, timeout=START_TIMEOUT_S, min_devices=min_devices)
            yield Rig(folder, kubelet, plugin)


def first_event(kubelet: FakeKubelet, kind: str, after: float, resource: str | None = None) -> Event | None:
    return next(
        (e for e in kubelet.events if e.kind == kind and e.at >= after and resource in (None, e.resource)), None
    )


async def wait_event(
    kubelet: FakeKubelet, kind: str, after: float, resource: str | None = None, timeout: float = START_TIMEOUT_S
) -> Event:
    await kubelet.wait_for(lambda: first_event(kubelet, kind, after, resource) is not None, timeout)
    event = first_event(kubelet, kind, after, resource)
    assert event is not None
    return event


async def timed_calls(call: Callable[[int], Awaitable[object]], calls: int, callers: int) -> list[float]:
    """Run `calls` calls spread over `callers` concurrent tasks; each call's latency in ms."""
    latencies: list[float] = []

    async def caller(first: int) -> None:
        for i in range(first, calls, callers):
            t0 = time.perf_counter()
            await call(i)
            latencies.append((time.perf_counter() - t0) * 1000)

    async with asyncio.TaskGroup() as tasks:
        for c in range(callers):
            tasks.create_task(caller(c))
    return latencies


def ensure_bytecode() -> str:
    """Compile nvdp's modules (and the bench's) to bytecode, as `pip install` does in the image.

    A checkout's editable install has no .pyc until Python writes one, and with
    PYTHONDONTWRITEBYTECODE set (common in containers and CI) it never does: every start would
    then compile nvdp's own sources, about 80 ms on the 2-core machine, which no node pays.
    Returns what was done, for the results."""
    import compileall

    import nvdp

    folders = [os.path.dirname(nvdp.__file__), os.path.dirname(__file__)]
    ok = all(compileall.compile_dir(f, quiet=1) for f in folders)
    return "compiled (as pip installs it)" if ok else "compile failed for some files"
