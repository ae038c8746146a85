"""The simulated backend at run time: a node from a profile, no GPU or driver needed, with fault
injection (events, lost GPUs, ECC counters, wait errors, the driver's recovery action, NVML calls
that hang, dirty GPUs, MIG repartitioning) for tests, demos and the control socket (`control.py`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from nvdp.backends.simulated.builtin import builtin_node, builtin_profiles
from nvdp.core.devices import GpuInfo, Node
from nvdp.core.health import EventKind, HealthEvent, ProbeSample
from nvdp.core.hygiene import MIB, GpuUsage
from nvdp.core.xid_policy import RecoveryAction
from nvdp.errors import EventWaitError, config_error_from, field_in

if TYPE_CHECKING:
    from nvdp.backends.driver_root import Roots
    from nvdp.backends.simulated.driver_root import SimulatedDriverRoot
    from nvdp.backends.simulated.profile import Profile

__all__ = ["SimulatedBackend", "SimulatedEventWaiter", "builtin_profiles", "load_profile"]


def load_profile(name_or_path: str, source: str = "--simulate") -> tuple[str, Profile]:
    """A profile through its schema (pydantic, PyYAML: imported only here); see profile.py."""
    from nvdp.backends.simulated.profile import load_profile as load

    return load(name_or_path, source)


@dataclass
class _GpuCondition:
    """What the simulated probe reports for one GPU (changed by fault injection)."""

    lost: bool = False
    volatile_uncorrected: int = 0
    remap_pending: bool = False
    remap_failed: bool = False
    retired_pending: bool = False
    recovery_action: int | None = None  # None: the simulated driver does not report one
    pids: tuple[int, ...] = ()  # compute processes left on the GPU (GPU hygiene)
    memory_used_mib: int = 0

    def sample(self) -> ProbeSample:
        if self.lost:
            return ProbeSample(reachable=False, lost=True, error="GPU is lost (simulated)")
        return ProbeSample(
            volatile_uncorrected=self.volatile_uncorrected,
            remap_pending=self.remap_pending,
            remap_failed=self.remap_failed,
            retired_pending=self.retired_pending,
            recovery_action=self.recovery_action,
        )


class SimulatedBackend:
    """A node from a profile. `node` can be replaced at run time (fault injection, MIG changes).

    Fault injection (thread-safe; from tests, or from outside through `simcontrol`): `inject_xid`
    (optionally with the driver's recovery action), `inject_ecc_event`, `lose`, `restore`,
    `raise_ecc`, `fail_waits`, `hang` / `release` (NVML calls that do not return), `make_dirty` /
    `clean` (GPU hygiene). Events go to the event waiter at once; conditions (lost, ECC counters,
    row remapping, the recovery action, usage) show at the next probe.
    MIG repartitioning: `set_mig_layout` (seen by the plugin's next rescan or SIGHUP).
    """

    name = "simulated"

    def __init__(self, profile: str, driver_root: str | None = None, source: str = "--simulate") -> None:
        """`source` is how the profile was given, for errors (`--simulate`, `NVDP_SIMULATE`)."""
        self._driver_root_folder = driver_root  # None: a temporary folder, made when first asked for
        self._driver_root: SimulatedDriverRoot | None = None
        self.profile_name = profile
        if profile in builtin_profiles():  # the precompiled node: no YAML, no schema (builtin.py)
            self.node, self._mig_minors_missing = builtin_node(profile, source)
        else:
            from nvdp.backends.simulated.expand import build_node

            self.profile_name, spec = load_profile(profile, source)
            self.node = build_node(self.profile_name, spec)
            self._mig_minors_missing = tuple(spec.mig_minors_missing)
        self._lock = threading.Lock()
        self._events: queue.Queue[HealthEvent | None] = queue.Queue()
        self._wait_errors = 0
        self._conditions: dict[str, _GpuCondition] = {}
        # Hangs: a probe of a GPU in `_hung_gpus`, or any event wait while `_hung_events`, blocks
        # until `release()` sets the event it waits on.
        self._released = threading.Event()
        self._hung_gpus: set[str] = set()
        self._hung_events = False
        self.hung_calls = 0  # calls blocked in a hang right now

    def discover(self) -> Node:
        return self.node

    def close(self) -> None:
        self._events.put(None)  # wake a waiter, if any
        self.release()  # let calls left hanging end (their threads were left behind)
        if self._driver_root is not None:
            self._driver_root.close()

    def driver_roots(self, node: Node) -> Roots:
        """The simulated driver root and dev root for this node (see `simulated.driver_root`)."""
        # Imported here: only CDI spec generation asks (it brings pathlib, tempfile, subprocess).
        from nvdp.backends.simulated.driver_root import SimulatedDriverRoot

        with self._lock:
            if self._driver_root is None:
                self._driver_root = SimulatedDriverRoot(self._driver_root_folder)
            return self._driver_root.sync(node)

    # --- health source ---------------------------------------------------------------------

    def watch_events(self, node: Node) -> SimulatedEventWaiter:
        return SimulatedEventWaiter(self)

    def probe(self, gpus: Sequence[str]) -> Mapping[str, ProbeSample]:
        for gpu in gpus:
            self._block_if_hung(gpu in self._hung_gpus)
        with self._lock:
            return {g: self._conditions.get(g, _GpuCondition()).sample() for g in gpus}

    def usage(self, gpu: str) -> GpuUsage:
        self._block_if_hung(gpu in self._hung_gpus)
        with self._lock:
            condition = self._conditions.get(gpu, _GpuCondition())
            return GpuUsage(pids=condition.pids, memory_used_bytes=condition.memory_used_mib * MIB)

    def _block_if_hung(self, hung: bool) -> None:
        """As a wedged driver: the call does not return until `release()`."""
        if not hung:
            return
        with self._lock:
            self.hung_calls += 1
            released = self._released
        released.wait()
        with self._lock:
            self.hung_calls -= 1

    def _next_event(self, timeout_s: float) -> HealthEvent | None:
        self._block_if_hung(self._hung_events)
        with self._lock:
            if self._wait_errors > 0:
                self._wait_errors -= 1
                raise EventWaitError("nvmlEventSetWait: Unknown Error (simulated)")
        try:
            return self._events.get(timeout=timeout_s)
        except queue.Empty:
            return None

    # --- fault injection -----------------------------------------------------------------------

    def gpu_uuid(self, gpu: int | str) -> str:
        """A GPU by index or UUID; ValueError names what exists."""
        for g in self.node.gpus:
            if gpu in (g.index, g.uuid) or (isinstance(gpu, str) and gpu.isdigit() and int(gpu) == g.index):
                return g.uuid
        raise ValueError(f"no GPU {gpu!r} on the simulated node (indexes 0-{len(self.node.gpus) - 1})")

    def inject(self, event: HealthEvent) -> None:
        """Any event as it is, even one for a GPU this node does not have (for tests)."""
        self._events.put(event)

    def inject_xid(
        self, gpu: int | str, xid: int, gi: int | None = None, ci: int | None = None,
        recovery_action: int | None = None,
    ) -> HealthEvent:
        """An XID event; with `recovery_action` the simulated driver also reports that action
        (with the event, and to every probe until `restore` or `set_recovery_action`)."""
        if ci is not None and gi is None:
            raise ValueError("a compute instance (ci) needs its GPU instance (gi)")
        if recovery_action is not None:
            self.set_recovery_action(gpu, recovery_action)
        event = HealthEvent(self.gpu_uuid(gpu), EventKind.XID, xid=xid, gi=gi, ci=ci, recovery_action=recovery_action)
        self._events.put(event)
        return event

    def set_recovery_action(self, gpu: int | str, action: int | None) -> str:
        """What the simulated driver reports as the GPU's recovery action (None: nothing)."""
        if action is not None and action < 0:
            raise ValueError(f"a recovery action is a number >= 0, not {action}")
        with self._lock:
            self._condition(gpu).recovery_action = action
        return self.gpu_uuid(gpu)

    def inject_ecc_event(self, gpu: int | str, corrected: bool = False) -> HealthEvent:
        kind = EventKind.ECC_CORRECTED if corrected else EventKind.ECC_UNCORRECTED
        event = HealthEvent(self.gpu_uuid(gpu), kind)
        self._events.put(event)
        return event

    def _condition(self, gpu: int | str) -> _GpuCondition:
        return self._conditions.setdefault(self.gpu_uuid(gpu), _GpuCondition())

    def lose(self, gpu: int | str) -> str:
        """The GPU falls off the bus: probes fail with GPU_IS_LOST until `restore`."""
        with self._lock:
            self._condition(gpu).lost = True
        return self.gpu_uuid(gpu)

    def restore(self, gpu: int | str) -> str:
        """The GPU is back after a reset: it answers, its volatile counters and pending flags are
        clear (a row-remapping failure stays: it is a hardware defect)."""
        with self._lock:
            condition = self._condition(gpu)
            condition.lost = False
            condition.volatile_uncorrected = 0
            condition.remap_pending = False
            condition.retired_pending = False
            if condition.recovery_action is not None:
                condition.recovery_action = RecoveryAction.NONE  # the reset was the action asked for
            condition.pids = ()
            condition.memory_used_mib = 0
        return self.gpu_uuid(gpu)

    def raise_ecc(
        self,
        gpu: int | str,
        count: int = 1,
        remap_pending: bool = False,
        remap_failed: bool = False,
        retired_pending: bool = False,
    ) -> str:
        """Volatile uncorrectable ECC errors rise by `count` (and flags are set), seen by the next probe."""
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        with self._lock:
            condition = self._condition(gpu)
            condition.volatile_uncorrected += count
            condition.remap_pending |= remap_pending
            condition.remap_failed |= remap_failed
            condition.retired_pending |= retired_pending
        return self.gpu_uuid(gpu)

    def fail_waits(self, count: int) -> None:
        """The next `count` event waits fail (as a wedged NVML would)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        with self._lock:
            self._wait_errors += count

    def hang(self, gpu: int | str | None = None, events: bool = False) -> str:
        """NVML calls stop returning, as with a wedged driver: the probe (and the usage query) of
        `gpu`, and/or with `events` every event wait, block until `release()`."""
        if gpu is None and not events:
            raise ValueError("say what hangs: a GPU, the event waits, or both")
        uuid = self.gpu_uuid(gpu) if gpu is not None else None
        with self._lock:
            if self._released.is_set():
                self._released = threading.Event()  # a new hang after an earlier release
            if uuid is not None:
                self._hung_gpus.add(uuid)
            self._hung_events |= events
        return ", ".join([*([f"the probe of {uuid}"] if uuid else []), *(["every event wait"] if events else [])])

    def release(self) -> None:
        """Every hung call returns, and no call hangs any more."""
        with self._lock:
            self._hung_gpus.clear()
            self._hung_events = False
            self._released.set()

    def make_dirty(self, gpu: int | str, pids: Sequence[int] = (), memory_mib: int = 0) -> str:
        """Leave compute processes and/or memory on a GPU, as a previous pod might (GPU hygiene)."""
        if memory_mib < 0 or any(p <= 0 for p in pids):
            raise ValueError("pids must be > 0 and memory_mib >= 0")
        with self._lock:
            condition = self._condition(gpu)
            condition.pids = tuple(pids)
            condition.memory_used_mib = memory_mib
        return self.gpu_uuid(gpu)

    def clean(self, gpu: int | str) -> str:
        return self.make_dirty(gpu)

    # --- MIG layout ----------------------------------------------------------------------------

    def set_mig_layout(
        self, gpu: int | str, devices: Sequence[str | Mapping[str, Any]] = (), enabled: bool = True
    ) -> GpuInfo:
        """Repartition one GPU, as mig-parted would: `set_mig_layout(1, ["3g.20gb", "2g.10gb"])`,
        `set_mig_layout(6, enabled=False)`. The plugin sees it on its next rescan or SIGHUP.

        GPU by index or UUID. Devices are profile names or MigDeviceSpec fields, numbered from slot
        0 unless given. Raises ValueError (unknown GPU) or ConfigError (a bad device, naming it);
        the node is then unchanged.
        """
        uuid = self.gpu_uuid(gpu)
        with self._lock:  # one layout change at a time; readers see the old or the new node
            return self._set_mig_layout(uuid, devices, enabled)

    def _set_mig_layout(self, uuid: str, devices: Sequence[str | Mapping[str, Any]], enabled: bool) -> GpuInfo:
        # Fault injection only: the schema (pydantic) is loaded when a layout is first changed.
        from pydantic import ValidationError

        from nvdp.backends.simulated.expand import simulated_mig_minors, with_mig_layout
        from nvdp.backends.simulated.profile import MigSpec

        gpus = list(self.node.gpus)
        position = next(i for i, g in enumerate(gpus) if g.uuid == uuid)
        gpu_index = gpus[position].index
        try:
            spec = MigSpec.model_validate({"enabled": enabled, "devices": list(devices)})
        except ValidationError as exc:
            raise config_error_from(exc, field_in("mig layout")) from exc
        gpus[position] = with_mig_layout(self.profile_name, gpus[position], spec, f"gpu {gpu_index}")
        minors = simulated_mig_minors(gpus, self._mig_minors_missing)
        self.node = replace(self.node, gpus=tuple(gpus), mig_minors=minors)
        return gpus[position]


class SimulatedEventWaiter:
    """The simulated node's event subscription (see `backend.EventWaiter`)."""

    def __init__(self, backend: SimulatedBackend) -> None:
        self._backend = backend
        self.failures: Mapping[str, str] = {}

    def wait(self, timeout_s: float) -> HealthEvent | None:
        return self._backend._next_event(timeout_s)

    def interrupt(self) -> None:
        self._backend._events.put(None)

    def close(self) -> None:
        pass
