"""Fakes shipped with nvdp for tests and demos: a kubelet that behaves like the real one."""

from nvdp.testing.fake_kubelet import FakeKubelet, KubeletError

__all__ = ["FakeKubelet", "KubeletError"]
