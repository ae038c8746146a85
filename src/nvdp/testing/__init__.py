"""Fakes and helpers shipped with nvdp for tests and demos: a kubelet that behaves like the real
one, a fake pynvml (a node described in dataclasses, for `NvmlBackend(nvml=...)`), and waits that
poll for a condition instead of sleeping.

The names are loaded on first use, so a process that needs only the fake pynvml (the NVML-path
benchmark's plugin) does not also load the fake kubelet and grpc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nvdp.testing.fake_kubelet import FakeKubelet, KubeletError
    from nvdp.testing.fake_nvml import FakeEvent, FakeGpu, FakeMigDevice, FakeNvLink, FakeNvml, h200_node
    from nvdp.testing.waiting import WAIT_S, eventually, eventually_sync, stays_true

_WHERE = {
    "FakeKubelet": "fake_kubelet", "KubeletError": "fake_kubelet",
    "FakeEvent": "fake_nvml", "FakeGpu": "fake_nvml", "FakeMigDevice": "fake_nvml", "FakeNvLink": "fake_nvml",
    "FakeNvml": "fake_nvml", "h200_node": "fake_nvml",
    "WAIT_S": "waiting", "eventually": "waiting", "eventually_sync": "waiting", "stays_true": "waiting",
}

__all__ = [
    "WAIT_S",
    "FakeEvent",
    "FakeGpu",
    "FakeKubelet",
    "FakeMigDevice",
    "FakeNvLink",
    "FakeNvml",
    "KubeletError",
    "eventually",
    "eventually_sync",
    "h200_node",
    "stays_true",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
