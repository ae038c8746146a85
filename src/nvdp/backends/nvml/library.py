"""Finding libnvidia-ml under the driver root, and opening NVML through the seam."""

from __future__ import annotations

import logging
import os

from nvdp.backends.nvml.seam import Nvml
from nvdp.errors import DiscoveryError

log = logging.getLogger("nvdp.nvml")  # stable name: operators filter on it

LIBRARY = "libnvidia-ml.so.1"
# Where the official plugin looks for the library under a non-root driver root, in this order.
LIBRARY_DIRS = (
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
)


def library_candidates(driver_root: str) -> tuple[str, ...]:
    """The library paths tried for a driver root, the plain soname last (as the official plugin)."""
    if driver_root in ("", "/"):
        return (LIBRARY,)
    return (*(os.path.join(driver_root, d, LIBRARY) for d in LIBRARY_DIRS), LIBRARY)


def open_nvml(nv: Nvml, driver_root: str) -> str:
    """Load the first library found under the driver root (else the plain soname, left to the
    dynamic loader) and initialise NVML; returns the path used. Raises `NvmlUnavailable` listing
    every path tried."""
    candidates = library_candidates(driver_root)
    chosen = next((c for c in candidates[:-1] if os.path.exists(c)), candidates[-1])
    nv.init(chosen, searched=candidates)
    log.info("NVML initialised", extra={"library": chosen})
    return chosen


def nvml_loadable(nv: Nvml | None = None) -> bool:
    """Whether NVML loads and initialises on this machine (for tests and diagnostics)."""
    nv = Nvml.real() if nv is None else nv
    try:
        nv.call("nvmlInit")
    except DiscoveryError:
        return False
    nv.shutdown()
    return True
