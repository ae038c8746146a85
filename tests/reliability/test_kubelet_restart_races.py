"""A re-created kubelet.sock causes re-registration under any interleaving with Register.

The plugin learns of a kubelet restart only from kubelet.sock being another file than the one it
registered through. Two interleavings used to lose the new kubelet for good: the old kubelet
removing its socket just before answering Register OK (the plugin then recorded "no socket" and
never saw the new one as new), and new kubelets binding one after another while Register calls
are in flight.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nvdp.config.options import Config
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet.manager import RetryPolicy
from nvdp.testing import WAIT_S, FakeKubelet
from tests.conftest import running_plugin
from tests.reliability.conftest import LogWatch

GPU = "nvidia.com/gpu"
FAST = RetryPolicy(first_s=0.01, max_s=0.2, timeout_s=2.0)
REBINDS = 200


class VanishingKubelet(FakeKubelet):
    """Answers Register OK but removes its kubelet.sock just before the answer leaves."""

    def __init__(self, folder: str) -> None:
        super().__init__(folder)
        self.vanished = asyncio.Event()

    async def Register(self, request: pb.RegisterRequest, context: Any) -> pb.Empty:
        answer = await super().Register(request, context)
        os.unlink(self.socket_path)
        self.vanished.set()
        return answer


async def test_kubelet_sock_gone_when_register_returns_then_a_new_kubelet(
    plugin_dir: Path, make_config: Callable[..., Config], logs: LogWatch
) -> None:
    old = VanishingKubelet(str(plugin_dir))
    await old.start()
    new = FakeKubelet(str(plugin_dir))
    try:
        async with running_plugin(make_config("dgx-h100"), retry=FAST) as plugin:
            await asyncio.wait_for(old.vanished.wait(), WAIT_S)
            await new.start()  # a new kubelet binds a new socket; nothing wipes the folder
            endpoint = await new.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
            assert sorted(endpoint.devices) == sorted(d.id for d in plugin.manager.tree[GPU].devices)
            assert plugin.manager.all_registered
    finally:
        await new.stop()
        await old.stop()


async def test_new_kubelets_binding_while_registering_never_lose_the_last(
    plugin_dir: Path, make_config: Callable[..., Config], logs: LogWatch
) -> None:
    rng = random.Random(13)
    kubelets = [FakeKubelet(str(plugin_dir))]
    await kubelets[0].start()
    try:
        async with running_plugin(make_config("dgx-h100"), retry=FAST) as plugin:
            await kubelets[0].wait_registered(GPU, timeout=WAIT_S, min_devices=8)
            for _ in range(REBINDS):
                await asyncio.sleep(rng.choice((0, 0, 0.001, 0.003, 0.01)))
                newer = FakeKubelet(str(plugin_dir))
                await newer.start()  # binds a new kubelet.sock over the old one's, as a restarted kubelet
                kubelets.append(newer)  # the old ones keep serving their connections (stopping one
                # here would remove kubelet.sock: grpc unlinks its path when a server stops)
            last = kubelets[-1]
            endpoint = await last.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
            assert sorted(endpoint.devices) == sorted(d.id for d in plugin.manager.tree[GPU].devices)
            assert last.errors == []
    finally:
        for kubelet in reversed(kubelets):
            await kubelet.stop()
