"""What the operations side may see of the plugin: a read-only view, not the plugin itself.

The metrics, the probes and the HTTP listener take an `OpsView`; the plugin's composition root
(app/) implements it. `state()` copies everything a scrape or a readiness answer shows at once,
on the event loop; `answers()` asks every resource server for a real gRPC answer (liveness).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nvdp.core.devices import DeviceTree
from nvdp.ops.counters import StatsSnapshot


@dataclass(frozen=True)
class Check:
    """One line of a probe answer: what was checked, whether it passed, and why not."""

    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class PluginState:
    """Everything one scrape or readiness answer shows, copied at once."""

    tree: DeviceTree
    registered: frozenset[str]
    registrations: int
    kubelet_restarts: int
    stats: StatsSnapshot
    backend: str = ""  # "" until a backend is open
    driver_version: str = ""
    cuda_driver_version: int = 0
    init_error: str = ""  # why initialisation failed, while idling with fail-on-init-error=false
    registers: bool = True  # False with an empty --kubelet-socket: serving is all there is to do
    simulated: bool = False  # --simulate: the GPUs are fake
    nvml_stuck_threads: int = 0  # threads still inside an NVML call that passed its deadline
    # MPS resources -> "" while their control daemon answers, else why they are held back (not served)
    mps: Mapping[str, str] = field(default_factory=dict)


class OpsView(Protocol):
    def state(self) -> PluginState: ...

    async def answers(self, timeout: float) -> Sequence[Check]:
        """One check per resource server: does it answer GetDevicePluginOptions within `timeout`?"""
        ...
