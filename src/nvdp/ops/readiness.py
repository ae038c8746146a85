"""Liveness and readiness, as the kubelet's HTTP probes see them (/healthz and /readyz).

Liveness: the event loop answers (the probe itself runs on it) and every resource server
answers a real GetDevicePluginOptions over its unix socket within a short deadline. A plugin
idling after an initialisation failure serves nothing and is alive: restarting it would not help.

Readiness: every served resource is registered with the kubelet and the kubelet holds its
ListAndWatch stream, i.e. the node advertises our devices. It turns false when the kubelet goes
away or restarts, and true again once the plugin has registered again. With an empty
--kubelet-socket (no registration) serving every resource is enough.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet._proto import api_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from nvdp.app.plugin import Plugin
    from nvdp.kubelet.server import ResourceServer

ANSWER_TIMEOUT_S = 1.0  # under the chart's 2 s probe timeout, so a hung server gets a 503, not a timeout
# Sent with the liveness call so that the gRPC metrics count only the kubelet's calls.
PROBE_METADATA = (("nvdp-probe", "liveness"),)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class ProbeResult:
    checks: tuple[Check, ...]
    ok: bool

    def text(self) -> str:
        """The kube-apiserver's verbose probe format: one "[+]name ok" / "[-]name failed: why" line per check."""
        lines = [f"[+]{c.name} ok" if c.ok else f"[-]{c.name} failed: {c.detail}" for c in self.checks]
        lines.append("ok" if self.ok else "not ok")
        return "\n".join(lines) + "\n"


async def _answers(server: ResourceServer, timeout: float) -> Check:
    name = f"server:{server.name}"
    try:
        async with grpc.aio.insecure_channel(f"unix://{server.socket_path}") as channel:
            await pb_grpc.DevicePluginStub(channel).GetDevicePluginOptions(
                pb.Empty(), timeout=timeout, metadata=PROBE_METADATA
            )
    except grpc.aio.AioRpcError as exc:
        return Check(name, False, f"GetDevicePluginOptions on {server.socket_path}: {exc.code().name}")
    return Check(name, True)


async def liveness(plugin: Plugin, timeout: float = ANSWER_TIMEOUT_S) -> ProbeResult:
    checks = [Check("event-loop", True)]
    checks += await asyncio.gather(*(_answers(s, timeout) for s in list(plugin.manager.servers.values())))
    return ProbeResult(tuple(checks), all(c.ok for c in checks))


def readiness(plugin: Plugin) -> ProbeResult:
    manager = plugin.manager
    if not manager.servers:
        why = f"initialisation failed: {plugin.init_error}" if plugin.init_error else "no resource served yet"
        return ProbeResult((Check("resources", False, why),), False)
    if not manager.registers:  # --kubelet-socket is empty: serving is all there is to do
        return ProbeResult(tuple(Check(f"serving:{name}", True) for name in manager.servers), True)
    checks = []
    for name in manager.servers:
        why = ""
        if name not in manager.registered:
            why = "not registered with the kubelet"
        elif plugin.stats.open_streams(name) < 1:
            why = "registered, but the kubelet holds no ListAndWatch stream"
        checks.append(Check(f"registered:{name}", not why, why))
    return ProbeResult(tuple(checks), all(c.ok for c in checks))
