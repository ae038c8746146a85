"""The console script leaves out what its config never uses (docs/benchmarks.md): without
--metrics-address it loads no TLS (Python's ssl module, OpenSSL); with it, /metrics works."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

from nvdp.testing import FakeKubelet
from nvdp.testing.process import PluginProcess

GPU = "nvidia.com/gpu"


def tls_loaded(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "/_ssl." in maps or "libssl" in maps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_plain_serve_loads_no_tls_and_answers(kubelet: FakeKubelet, plugin_dir: Path) -> None:
    async with PluginProcess(str(plugin_dir), ("--simulate", "pcie-l40s")) as plugin:
        endpoint = await kubelet.wait_registered(GPU, timeout=60, min_devices=4)
        ids = sorted(endpoint.devices)
        assert (await kubelet.allocate(GPU, ids[:1])).envs["NVIDIA_VISIBLE_DEVICES"] == ids[0]
        assert not tls_loaded(plugin.pid), plugin.log()


async def test_with_metrics_the_listener_works(kubelet: FakeKubelet, plugin_dir: Path) -> None:
    port = free_port()
    args = ("--simulate", "pcie-l40s", f"--metrics-address=127.0.0.1:{port}")
    async with PluginProcess(str(plugin_dir), args) as plugin:
        await kubelet.wait_registered(GPU, timeout=60, min_devices=4)
        with await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            body = r.read().decode()
        assert r.status == 200 and "nvdp_" in body
        assert tls_loaded(plugin.pid)  # prometheus_client imports ssl: it was not kept out


def test_other_commands_keep_tls() -> None:
    # Only the plain serve path marks ssl absent: `nvdp status` may read an https:// endpoint.
    import subprocess
    import sys

    code = ("import sys; from nvdp.cli import main; "
            "sys.argv = ['nvdp', 'status', '--address', 'https://127.0.0.1:1/metrics']; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "cannot read https://127.0.0.1:1/metrics" in done.stderr
    assert "unknown url type" not in done.stderr, done.stderr
