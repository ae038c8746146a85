"""Fakes and helpers shipped with nvdp for tests and demos: a kubelet that behaves like the real
one, a fake pynvml (a node described in dataclasses, for `NvmlBackend(nvml=...)`), and waits that
poll for a condition instead of sleeping."""

from nvdp.testing.fake_kubelet import FakeKubelet, KubeletError
from nvdp.testing.fake_nvml import FakeEvent, FakeGpu, FakeMigDevice, FakeNvLink, FakeNvml, h200_node
from nvdp.testing.waiting import WAIT_S, eventually, eventually_sync, stays_true

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
