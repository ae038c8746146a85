"""Liveness and readiness, as the kubelet's HTTP probes see them (/healthz and /readyz).

Liveness: the event loop answers (the probe itself runs on it) and every resource server
answers a real GetDevicePluginOptions over its unix socket within a short deadline. A plugin
idling after an initialisation failure serves nothing and is alive: restarting it would not help.

Readiness: every served resource is registered with the kubelet and the kubelet holds its
ListAndWatch stream, i.e. the node advertises our devices. It turns false when the kubelet goes
away or restarts, and true again once the plugin has registered again. With an empty
--kubelet-socket (no registration) serving every resource is enough. An MPS resource held back
because its control daemon does not answer makes the plugin not ready, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvdp.ops.view import Check, OpsView, PluginState

ANSWER_TIMEOUT_S = 1.0  # under the chart's 2 s probe timeout, so a hung server gets a 503, not a timeout


@dataclass(frozen=True)
class ProbeResult:
    checks: tuple[Check, ...]
    ok: bool

    def text(self) -> str:
        """The kube-apiserver's verbose probe format: one "[+]name ok" / "[-]name failed: why" line per check."""
        lines = [f"[+]{c.name} ok" if c.ok else f"[-]{c.name} failed: {c.detail}" for c in self.checks]
        lines.append("ok" if self.ok else "not ok")
        return "\n".join(lines) + "\n"


async def liveness(view: OpsView, timeout: float = ANSWER_TIMEOUT_S) -> ProbeResult:
    checks = [Check("event-loop", True), *await view.answers(timeout)]
    return ProbeResult(tuple(checks), all(c.ok for c in checks))


def readiness(state: PluginState) -> ProbeResult:
    held_back = tuple(Check(f"mps:{name}", False, why) for name, why in state.mps.items() if why)
    if not state.tree and held_back:
        return ProbeResult(held_back, False)
    if not state.tree:
        why = f"initialisation failed: {state.init_error}" if state.init_error else "no resource served yet"
        return ProbeResult((Check("resources", False, why),), False)
    if not state.registers:  # --kubelet-socket is empty: serving is all there is to do
        serving = tuple(Check(f"serving:{name}", True) for name in state.tree)
        return ProbeResult(serving + held_back, not held_back)
    checks = []
    for name in state.tree:
        why = ""
        if name not in state.registered:
            why = "not registered with the kubelet"
        elif state.stats.streams.get(name, 0) < 1:
            why = "registered, but the kubelet holds no ListAndWatch stream"
        checks.append(Check(f"registered:{name}", not why, why))
    checks += held_back
    return ProbeResult(tuple(checks), all(c.ok for c in checks))
