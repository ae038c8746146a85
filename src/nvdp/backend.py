"""The discovery seam: every source of GPUs (real NVML, the simulator) implements `GpuBackend`."""

from __future__ import annotations

from typing import Protocol

from nvdp.devices import Node


class GpuBackend(Protocol):
    """Finds the GPUs of this node.

    Resource handling: a backend owns its library state (NVML init/shutdown) from construction
    until `close()`; `discover()` may be called again (on SIGHUP, on a MIG rescan).
    Error handling: `discover()` raises `errors.DiscoveryError` subclasses, never library errors.
    """

    name: str

    def discover(self) -> Node: ...

    def close(self) -> None: ...
