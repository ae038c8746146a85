from __future__ import annotations

import pytest

from nvdp.backends.nvml.library import nvml_loadable


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if nvml_loadable():
        return
    skip = pytest.mark.skip(reason="no NVIDIA driver/NVML on this machine (run on a GPU node: make gpu-test)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
