"""Sharing limits: the ListAndWatch message and the plugin's RSS at the sharing sizes operators ask for.

- 8 GPUs x 48 MPS replicas (dgx-h100): the most MPS clients a GPU of compute capability >= 7.5
  takes, so the largest MPS device list of an 8-GPU node. The simulated MPS control daemon runs,
  as the plugin serves an MPS resource only once its daemon answers;
- 8 GPUs x 1024 time-slicing replicas;
- 8 exclusive GPUs, for comparison.

The message size is that of the message the plugin sends (server.py's list message, serialized
by protobuf), checked against the list the fake kubelet received; RSS is VmRSS of the real
`nvidia-device-plugin` child once the fake kubelet holds the whole list.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from bench.harness import Figure, Settings
from bench.rig import DGX_GPUS, SIMULATED, START_TIMEOUT_S, kubelet_folder
from nvdp.backends.mps import MpsControl
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.load import load
from nvdp.core import mps
from nvdp.core.resources import GPU_RESOURCE, build_tree
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet.server import KUBELET_MAX_MESSAGE_BYTES, ResourceServer, ServingContext
from nvdp.testing.mps import SimulatedMps
from nvdp.testing.process import PluginProcess, memory_kib, rss_kib

SETTLE_S = 0.5  # let the child finish its start-up allocations before reading RSS
MPS_REPLICAS = 48
TIME_SLICING_REPLICAS = 1024


@dataclass(frozen=True)
class Case:
    label: str
    config: str  # the config file ("" for none)
    replicas: int
    mps: bool = False

    @property
    def devices(self) -> int:
        return DGX_GPUS * self.replicas


def _block(kind: str, replicas: int) -> str:
    return f"version: v1\nsharing:\n  {kind}:\n    resources:\n    - {{name: {GPU_RESOURCE}, replicas: {replicas}}}\n"


CASES = (
    Case("8 exclusive GPUs", "", 1),
    Case(f"8 GPUs x {MPS_REPLICAS} MPS replicas", _block("mps", MPS_REPLICAS), MPS_REPLICAS, mps=True),
    Case(f"8 GPUs x {TIME_SLICING_REPLICAS} time-slicing replicas", _block("timeSlicing", TIME_SLICING_REPLICAS),
         TIME_SLICING_REPLICAS),
)


def sent_bytes(case: Case, folder: str) -> int:
    """The size of the message the plugin's server builds for this config (no process, no socket)."""
    path = Path(folder) / "sent.yaml"
    path.write_text(case.config or "version: v1\n")
    cfg = load({"simulate": "dgx-h100", "config_file": str(path), "mps_root": "/run/nvidia/mps"}, {})
    node = SimulatedBackend("dgx-h100").discover()
    resource = build_tree(node, cfg)[GPU_RESOURCE]
    server = ResourceServer(resource, ServingContext(cfg, node.topology, node.control_devices), folder)
    return server.list_message().ByteSize()


async def served(case: Case) -> tuple[float, float, int]:
    """(RSS MiB, RssAnon MiB, bytes the kubelet received) with the real plugin serving the case."""
    async with kubelet_folder() as (folder, kubelet):
        sim = SimulatedMps(Path(folder))
        args = list(SIMULATED)
        if case.config:
            path = Path(folder) / "config.yaml"
            path.write_text(case.config)
            args.append(f"--config-file={path}")
        if case.mps:
            args += [f"--mps-root={sim.root}", f"--mps-dir={sim.root}", f"--mps-control={sim.control}"]
            for folder_of in (mps.pipe_dir, mps.log_dir):
                Path(folder_of(str(sim.root), GPU_RESOURCE)).mkdir(parents=True, exist_ok=True)
            await MpsControl(sim.control, str(sim.root)).start_daemon(GPU_RESOURCE)
        try:
            async with PluginProcess(folder, args) as plugin:
                endpoint = await kubelet.wait_registered(GPU_RESOURCE, timeout=START_TIMEOUT_S,
                                                         min_devices=case.devices)
                await asyncio.sleep(SETTLE_S)
                rss = rss_kib(plugin.pid) / 1024
                anonymous = memory_kib(plugin.pid)["RssAnon"] / 1024
                received = pb.ListAndWatchResponse(devices=list(endpoint.devices.values())).ByteSize()
        finally:
            if case.mps:
                sim.kill_daemons()
    return rss, anonymous, received


async def run(settings: Settings) -> list[Figure]:
    figures = []
    folder = os.environ.get("TMPDIR", "/tmp")
    for case in CASES:
        size = sent_bytes(case, folder)
        rss, anonymous, received = [], [], []
        for _ in range(settings.n(3, 1)):
            r, a, got = await served(case)
            rss.append(r)
            anonymous.append(a)
            received.append(got)
        if set(received) != {size}:
            raise AssertionError(f"{case.label}: the kubelet received {received} bytes, the plugin built {size}")
        share = size / KUBELET_MAX_MESSAGE_BYTES
        figures += [
            Figure(f"ListAndWatch message, {case.label} ({case.devices:,} devices)", "bytes", [float(size)],
                   note=f"{share:.2%} of the kubelet's 4 MiB; {size / case.devices:.1f} bytes per device",
                   extra={"devices": case.devices, "limit_bytes": KUBELET_MAX_MESSAGE_BYTES}),
            Figure(f"RSS serving {case.label}", "MiB", rss,
                   note="VmRSS of the nvidia-device-plugin child once the kubelet holds the list"
                        + ("; the simulated MPS control daemon answering" if case.mps else "")),
            Figure(f"RssAnon serving {case.label}", "MiB", anonymous),
        ]
    return figures
