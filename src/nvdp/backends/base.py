"""The discovery seam: every source of GPUs (real NVML, the simulator) implements `GpuBackend`;
backends that can watch GPU health also implement `HealthSource`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from nvdp.core.devices import Node
from nvdp.core.health import HealthEvent, ProbeSample
from nvdp.core.hygiene import GpuUsage


class GpuBackend(Protocol):
    """Finds the GPUs of this node.

    Resource handling: a backend owns its library state (NVML init/shutdown) from construction
    until `close()`; `discover()` may be called again (on SIGHUP, on a MIG rescan).
    Error handling: `discover()` raises `errors.DiscoveryError` subclasses, never library errors.
    """

    name: str

    def discover(self) -> Node: ...

    def close(self) -> None: ...


class EventWaiter(Protocol):
    """An event subscription for some GPUs, used by one thread.

    `wait` blocks up to `timeout_s` and returns None on a timeout; it raises
    `errors.EventWaitError` when the wait itself fails. `interrupt` may be called from another
    thread to end a blocked wait early where the source allows it. `close` releases the
    subscription once the waiting thread is done.
    `failures` lists GPUs whose events could not be registered (UUID -> why).
    """

    failures: Mapping[str, str]

    def wait(self, timeout_s: float) -> HealthEvent | None: ...

    def interrupt(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class HealthSource(Protocol):
    """A backend that can report GPU health: events, and a probe of each GPU (blocking calls,
    run in a thread)."""

    def watch_events(self, node: Node) -> EventWaiter: ...

    def probe(self, gpus: Sequence[str]) -> Mapping[str, ProbeSample]: ...


@runtime_checkable
class UsageSource(Protocol):
    """A backend that can say what runs on a GPU (GPU hygiene before hand-out; a blocking call,
    run in a thread with a deadline)."""

    def usage(self, gpu: str) -> GpuUsage: ...
