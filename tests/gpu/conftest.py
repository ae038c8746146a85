from __future__ import annotations

import pytest


def nvml_available() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if nvml_available():
        return
    skip = pytest.mark.skip(reason="no NVIDIA driver/NVML on this machine (run on a GPU node: make gpu-test)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
