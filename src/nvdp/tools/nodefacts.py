"""Facts read off a node's files, each under a root that tests point into a temporary folder:
the kernel driver and GPUs under /proc and /sys, library versions, processes, inotify use and CDI
specs. Used by `nvdp doctor`; every reader returns an empty answer rather than raising when a file
is missing or unreadable.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

NVIDIA_PCI_VENDOR = "0x10de"


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def kernel_module_version(proc: Path) -> str | None:
    """The loaded kernel module's version from /proc/driver/nvidia/version, or None."""
    text = read_text(proc / "driver" / "nvidia" / "version")
    if text is None:
        return None
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else ""


def library_version(path: Path) -> str:
    """"580.65.06" when libnvidia-ml.so.1 links to libnvidia-ml.so.580.65.06, else ""."""
    match = re.search(r"\.so\.(\d+\.\d+(?:\.\d+)*)$", Path(os.path.realpath(path)).name)
    return match.group(1) if match else ""


def pci_gpus(sys: Path) -> set[str]:
    """Bus IDs of NVIDIA display/3D controllers on the PCI bus (NVSwitches are bridges: left out)."""
    found = set()
    devices = sys / "bus" / "pci" / "devices"
    for dev in devices.iterdir() if devices.is_dir() else ():
        vendor, klass = read_text(dev / "vendor"), read_text(dev / "class")
        if vendor and klass and vendor.strip() == NVIDIA_PCI_VENDOR and klass.strip().startswith("0x03"):
            found.add(dev.name.lower())
    return found


def kernel_gpus(proc: Path) -> set[str]:
    folder = proc / "driver" / "nvidia" / "gpus"
    return {p.name.lower() for p in folder.iterdir()} if folder.is_dir() else set()


def running_processes(proc: Path) -> set[str]:
    names = set()
    for pid in proc.glob("[0-9]*"):
        comm = read_text(pid / "comm")
        if comm:
            names.add(comm.strip())
    return names


def inotify_in_use(proc: Path, uid: int) -> int:
    """inotify instances held by processes of `uid` (those whose fds we may read)."""
    count = 0
    for pid in proc.glob("[0-9]*"):
        try:
            if pid.stat().st_uid != uid:
                continue
            fds = list((pid / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                count += os.readlink(fd) == "anon_inode:inotify"
    return count


def cdi_specs(folders: Sequence[Path]) -> dict[str, set[str]]:
    """CDI kind -> device names, from every spec file in the folders."""
    kinds: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted(folder.glob("*")) if folder.is_dir() else ():
            if path.suffix not in (".yaml", ".yml", ".json"):
                continue
            try:
                spec = yaml.safe_load(path.read_text())  # JSON is YAML
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(spec, dict) and isinstance(spec.get("kind"), str):
                names = {str(d.get("name")) for d in spec.get("devices") or () if isinstance(d, dict)}
                kinds.setdefault(spec["kind"], set()).update(names)
    return kinds
