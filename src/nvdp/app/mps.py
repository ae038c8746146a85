"""The plugin's MPS gate: an MPS-shared resource is served only while its control daemon answers.

For each MPS resource of the served tree a task asks the daemon what the official plugin asks
(`get_default_active_thread_percentage`, through `nvidia-cuda-mps-control` with only the two
`CUDA_MPS_*` variables). Until it answers, the resource is held back (not served, so not
registered); the reason is logged once and shown in `state()` (metrics, readiness). A failing
check is retried with back-off from 1 s (the official plugin waits 30 s); an answering daemon is
asked again every few seconds, and a daemon that stops answering takes its resource down until
it answers again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nvdp.config.options import Config
from nvdp.core.backoff import Backoff
from nvdp.core.devices import DeviceTree
from nvdp.core.mps import MpsDaemon
from nvdp.errors import MpsError
from nvdp.ops.logs import LogOnce

log = logging.getLogger("nvdp.mps")  # new with MPS support

NOT_CHECKED = "the MPS control daemon was not asked yet"
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]
Prober = Callable[[str], Awaitable[str | None]]


@dataclass(frozen=True)
class MpsTiming:
    first_s: float = 1.0  # back-off after the first failed check, doubling...
    max_s: float = 30.0  # ...up to the official plugin's fixed 30 s
    recheck_s: float = 5.0  # while the daemon answers: how often it is asked again
    timeout_s: float = 10.0  # one check's limit


DEFAULT_MPS_TIMING = MpsTiming()


class MpsGate:
    """Which MPS resources may be served. Error handling: a check that fails is a reason, never
    an exception; the tasks run until `watch` drops their resource or the plugin stops them."""

    def __init__(self, on_change: Callable[[], Awaitable[None]], timing: MpsTiming = DEFAULT_MPS_TIMING) -> None:
        self._on_change = on_change
        self.timing = timing
        self._status: dict[str, str] = {}  # resource -> "" (answers) or why not
        self._tasks: dict[str, tuple[tuple[str, str], asyncio.Task[None]]] = {}
        self._logged = LogOnce()

    @property
    def status(self) -> Mapping[str, str]:
        """Every MPS resource watched: "" when its daemon answers, otherwise why it is held back."""
        return dict(self._status)

    def hold_back(self, tree: DeviceTree) -> DeviceTree:
        """The tree without the MPS resources whose daemon has not answered."""
        if not self._status:
            return tree
        return {name: r for name, r in tree.items() if self._status.get(name, "") == ""}

    def watch(self, daemons: Sequence[MpsDaemon], cfg: Config, spawn: Spawn) -> None:
        """Check these resources from now on (others stop being checked). A resource whose check
        did not change (same program, same root) keeps its state, so a reload does not take it down."""
        wanted = {d.resource: (cfg.mps_control, cfg.mps_dir) for d in daemons}
        for name in list(self._tasks):
            if self._tasks[name][0] != wanted.get(name):
                self._tasks.pop(name)[1].cancel()
                self._status.pop(name, None)
                self._logged.forget(name)
        for name, key in wanted.items():
            if name in self._tasks:
                continue
            from nvdp.backends.mps import MpsControl  # subprocess, tempfile, shutil: only with MPS on

            try:
                control = MpsControl(key[0], key[1], self.timing.timeout_s)
            except MpsError as exc:  # e.g. an empty --mps-control
                self._status[name] = str(exc)
                continue
            self._status[name] = NOT_CHECKED
            self._tasks[name] = (key, spawn(self._check(name, control.probe), f"mps-check:{name}"))

    async def _check(self, resource: str, probe: Prober) -> None:
        backoff = Backoff(self.timing.first_s, self.timing.max_s)
        failures = 0
        while True:
            why = await probe(resource)
            was_ready = self._status.get(resource) == ""
            if why is None:
                if not was_ready:
                    log.info("MPS control daemon answers; serving the resource", extra={"resource": resource})
                self._logged.forget(resource)
                failures = 0
                delay = self.timing.recheck_s
                self._status[resource] = ""
            else:
                failures += 1
                delay = backoff.delay(failures)
                if self._logged.first(why, key=resource):
                    log.warning(
                        "MPS control daemon does not answer; the resource is not served until it does "
                        f"(asking again after {delay:g} s, backing off to {self.timing.max_s:g} s)",
                        extra={"resource": resource, "reason": why},
                    )
                self._status[resource] = why
            if was_ready != (why is None):
                await self._on_change()
            await asyncio.sleep(delay)
