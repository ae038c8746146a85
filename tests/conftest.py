"""Shared fixtures: a short socket folder, a strict fake kubelet, and a running plugin."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from nvdp.app.discovery import BackendFactory, open_backend
from nvdp.app.plugin import Plugin
from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.testing import FakeKubelet


@pytest.fixture
def plugin_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer than that.
    folder = Path(tempfile.mkdtemp(prefix="nvdp-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def make_config(plugin_dir: Path) -> Callable[..., Config]:
    """Config for a simulated node whose kubelet socket is in plugin_dir; CLI-style overrides."""

    def make(profile: str = "dgx-h100", environ: dict[str, str] | None = None, **cli: Any) -> Config:
        values: dict[str, Any] = {"simulate": profile, "kubelet_socket": str(plugin_dir / "kubelet.sock")}
        values.update(cli)
        return load(values, environ or {})

    return make


@pytest.fixture
async def kubelet(plugin_dir: Path) -> AsyncIterator[FakeKubelet]:
    async with FakeKubelet(str(plugin_dir)) as fake:
        yield fake


@asynccontextmanager
async def running_plugin(
    cfg: Config,
    backend_factory: BackendFactory = open_backend,
    reload_config: Callable[[], Config] | None = None,
    **plugin_options: Any,
) -> AsyncIterator[Plugin]:
    """Run the real plugin in this event loop until the block ends; errors in it propagate."""
    plugin = Plugin(cfg, backend_factory=backend_factory, reload_config=reload_config, **plugin_options)
    task = asyncio.create_task(plugin.run())
    started = asyncio.create_task(plugin.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # raises the start-up error
    try:
        yield plugin
    finally:
        plugin.stop()
        await asyncio.wait_for(task, timeout=10)
