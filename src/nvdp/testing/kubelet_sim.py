"""`nvdp testing fake-kubelet --dir DIR`: the shipped fake kubelet (`fake_kubelet.FakeKubelet`)
as a command, so a plugin started with `--kubelet-socket DIR/kubelet.sock` can be watched by hand:
it serves Registration, dials each plugin back, holds ListAndWatch and prints what it sees, and
with `--allocate N` asks for N devices of each resource once (GetPreferredAllocation, then Allocate),
as the kubelet does when a pod asking for N devices is admitted."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import grpc

from nvdp.testing.fake_kubelet import Event, FakeKubelet, KubeletError, PluginEndpoint


class KubeletSim:
    """Prints the fake kubelet's events; allocates once per resource when asked to."""

    def __init__(self, folder: str, allocate: int, echo: Callable[[str], None]) -> None:
        self.kubelet = FakeKubelet(folder, on_event=self._on_event)
        self.allocate = allocate
        self.echo = echo
        self._allocated: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        await self.kubelet.start()
        self.echo(f"fake kubelet serving {self.kubelet.socket_path}: start a plugin with "
                  f"--kubelet-socket {self.kubelet.socket_path}")
        try:
            await stop.wait()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await self.kubelet.stop()
            self.echo("fake kubelet stopped")

    def _on_event(self, event: Event) -> None:
        if event.kind == "register":
            self.echo(f"registered {event.resource} (endpoint {event.detail})")
        elif event.kind == "rejected":
            self.echo(f"refused {event.resource}: {event.detail}")
        elif event.kind == "disconnected":
            self.echo(f"{event.resource}: ListAndWatch disconnected ({event.detail})")
        elif event.kind == "devices":
            plugin = self.kubelet.plugins.get(event.resource)
            if plugin is None:
                return
            self._print_devices(plugin)
            if self.allocate and event.resource not in self._allocated and len(plugin.healthy) >= self.allocate:
                self._allocated.add(event.resource)
                task = asyncio.get_running_loop().create_task(self._allocate(plugin))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _print_devices(self, plugin: PluginEndpoint) -> None:
        healthy = plugin.healthy
        self.echo(f"{plugin.resource}: {len(plugin.devices)} devices, {len(healthy)} healthy")
        unhealthy = [i for i in plugin.devices if i not in set(healthy)]
        if unhealthy:
            shown = ", ".join(unhealthy[:8]) + (f" and {len(unhealthy) - 8} more" if len(unhealthy) > 8 else "")
            self.echo(f"  unhealthy: {shown}")

    async def _allocate(self, plugin: PluginEndpoint) -> None:
        resource, available = plugin.resource, plugin.healthy
        try:
            chosen = available[: self.allocate]
            if plugin.options.get_preferred_allocation_available:
                chosen = await self.kubelet.preferred_allocation(resource, available, [], self.allocate)
                self.echo(f"{resource}: preferred {self.allocate} of {len(available)}: {','.join(chosen)}")
            answer = await self.kubelet.allocate(resource, chosen or available[: self.allocate])
        except (KubeletError, grpc.aio.AioRpcError) as exc:
            self.echo(f"{resource}: allocation failed: {exc}")
            return
        parts = [f"{k}={v}" for k, v in sorted(answer.envs.items())]
        parts += [f"mount {m.host_path}:{m.container_path}" for m in answer.mounts]
        parts += [f"device {d.host_path}:{d.container_path}:{d.permissions}" for d in answer.devices]
        parts += [f"annotation {k}={v}" for k, v in sorted(answer.annotations.items())]
        parts += [f"cdi {c.name}" for c in answer.cdi_devices]
        self.echo(f"{resource}: allocated {len(chosen)}: {' '.join(parts) or '(nothing to inject)'}")


async def run_fake_kubelet(folder: str, allocate: int, echo: Callable[[str], None],
                           stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (SIGINT/SIGTERM when run from the command line)."""
    stop = stop or asyncio.Event()
    sim = KubeletSim(folder, allocate, echo)
    with contextlib.suppress(asyncio.CancelledError):
        await sim.run(stop)
