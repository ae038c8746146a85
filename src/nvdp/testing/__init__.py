"""Fakes and helpers shipped with nvdp for tests and demos: a kubelet that behaves like the real
one, and waits that poll for a condition instead of sleeping."""

from nvdp.testing.fake_kubelet import FakeKubelet, KubeletError
from nvdp.testing.waiting import WAIT_S, eventually, eventually_sync, stays_true

__all__ = ["WAIT_S", "FakeKubelet", "KubeletError", "eventually", "eventually_sync", "stays_true"]
