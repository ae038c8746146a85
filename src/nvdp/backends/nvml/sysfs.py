"""Node files the NVML backend reads beside NVML: a GPU's NUMA node, PCI class and PCI config
space (for the vGPU capability) from sysfs, and the MIG capability minors from /proc."""

from __future__ import annotations

import logging
import os

from nvdp.core import mig, pci
from nvdp.core.devices import VgpuInfo
from nvdp.core.topology import bus_key
from nvdp.errors import DiscoveryError

log = logging.getLogger("nvdp.nvml")  # stable name: operators filter on it


def _read(path: str) -> str:
    # open(), not pathlib: pathlib costs the serve path ~5 ms of imports and nothing else needs it.
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_numa_node(bus_id: str, sysfs_root: str = "/sys") -> int | None:
    """NUMA node from sysfs; None when unreadable or negative. Garbage is an error (as upstream)."""
    path = os.path.join(sysfs_root, "bus/pci/devices", bus_key(bus_id), "numa_node")
    try:
        text = _read(path).strip()
    except OSError:
        return None
    try:
        node = int(text)
    except ValueError:
        raise DiscoveryError(f"{path}: numa_node is not an integer: {text!r}") from None
    return node if node >= 0 else None


def read_pci_class(bus_id: str, sysfs_root: str = "/sys") -> int | None:
    """The GPU's PCI class code from sysfs; None when the file is missing or unreadable."""
    try:
        with open(os.path.join(sysfs_root, "bus/pci/devices", bus_key(bus_id), "class"), encoding="ascii") as f:
            text = f.read()
    except (OSError, ValueError):
        return None
    return pci.parse_class(text)


def read_vgpu(bus_id: str, sysfs_root: str = "/sys") -> VgpuInfo | None:
    """The vGPU host driver from the GPU's PCI config space; None when it is not a vGPU or the
    config space cannot be read in full (only root reads past its first 64 bytes)."""
    path = os.path.join(sysfs_root, "bus/pci/devices", bus_key(bus_id), "config")
    try:
        with open(path, "rb") as f:
            config = f.read()
    except OSError:
        return None
    if len(config) < pci.FULL_CONFIG:
        log.debug("PCI config space not fully readable: vGPU not detectable", extra={"path": path})
        return None
    return pci.vgpu_info(config)


def mig_minors_candidates(driver_root: str) -> tuple[str, ...]:
    """Where mig-minors is looked for: under the driver root first, then our own /proc (where the
    official plugin reads it; /proc/driver is the host's in any container)."""
    own = mig.MIG_MINORS_PATH
    if driver_root in ("", "/"):
        return (own,)
    return (os.path.join(driver_root, own.lstrip("/")), own)


def read_mig_minors(candidates: tuple[str, ...]) -> dict[str, int]:
    """The first mig-minors file that exists, parsed; none at all gives an empty map (as upstream:
    MIG devices then lack their capability nodes)."""
    for path in candidates:
        try:
            text = _read(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DiscoveryError(f"cannot read {path}: {exc.strerror or exc}") from exc
        minors, bad = mig.parse_mig_minors(text)
        for line in bad:
            log.warning("skipping unparsable line in the MIG minors file", extra={"path": path, "line": line})
        return minors
    log.warning("no MIG minors file found; MIG devices get no capability device nodes",
                extra={"searched": ",".join(candidates)})
    return {}
