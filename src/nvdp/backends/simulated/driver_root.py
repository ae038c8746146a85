"""A simulated driver root and dev root, so that CDI spec generation runs end to end on any machine.

The folder looks like a host with the NVIDIA driver installed, in miniature:
- `usr/lib/<arch>-linux-gnu/lib*.so.<driver version>`: tiny ELF shared objects with the driver's
  sonames (no code), their soname links, `vdpau/libvdpau_nvidia.so.<version>`, and a real
  `etc/ld.so.cache` made by `ldconfig -r` (needs root for its chroot; otherwise nvdp writes the same
  format itself, `backends.ldcache.encode`);
- `usr/bin/nvidia-smi` and the other driver binaries (shell scripts saying they are simulated),
  `lib/firmware/nvidia/<version>/gsp_*.bin`, the vulkan/EGL/OpenCL config files and the
  persistenced socket;
- `dev/`: the node's control nodes, `nvidia<minor>` for every GPU, the MIG capability nodes of its
  MIG devices and the GDS, MOFED, gdrcopy and IMEX channel 0 nodes. As root they are character
  devices with /dev/null's numbers (a container that opens them gets /dev/null, nothing more);
  without root they are plain files, which a real container runtime refuses.

The folder is a fresh temporary one owned by the backend (removed when it closes), or one the caller
names (kept), which must be empty or an earlier simulated root (a marker file says so), so that a
real driver root is never written into.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

from nvdp.backends import ldcache
from nvdp.backends.driver_root import Roots
from nvdp.backends.simulated.elf import shared_object
from nvdp.core import mig
from nvdp.core.devices import Node
from nvdp.errors import CdiSpecError

MARKER = ".nvdp-simulated-driver-root"
TRIPLES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu", "ppc64le": "powerpc64le-linux-gnu"}
# (library name without version, soname suffix; None: the soname is the versioned file name itself)
LIBRARIES = (
    ("libcuda.so", "1"),
    ("libcudadebugger.so", "1"),
    ("libnvidia-ml.so", "1"),
    ("libnvidia-ptxjitcompiler.so", "1"),
    ("libnvidia-nvvm.so", "4"),
    ("libnvidia-cfg.so", "1"),
    ("libnvidia-opencl.so", "1"),
    ("libnvidia-allocator.so", "1"),
    ("libnvidia-gpucomp.so", None),
    ("libnvidia-glcore.so", None),
)
VDPAU = ("libvdpau_nvidia.so", "1")
BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
            "nvidia-cuda-mps-server")
FIRMWARE = ("gsp_ga10x.bin", "gsp_tu10x.bin")
FEATURE_NODES = ("/dev/nvidia-fs0", "/dev/infiniband/uverbs0", "/dev/infiniband/rdma_cm", "/dev/gdrdrv",
                 "/dev/nvidia-caps-imex-channels/channel0")
PERSISTENCED_SOCKET = "run/nvidia-persistenced/socket"
NOTE = "nvdp simulated driver file"


def library_folder() -> str:
    return f"/usr/lib/{TRIPLES.get(platform.machine(), TRIPLES['x86_64'])}"


def find_ldconfig() -> str | None:
    return shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.access(p, os.X_OK)), None)


class SimulatedDriverRoot:
    """One simulated root; `sync(node)` brings its files and device nodes in line with the node."""

    def __init__(self, folder: str | None = None) -> None:
        if folder is None:
            self.folder = tempfile.mkdtemp(prefix="nvdp-sim-root-")
            self._owned = True
        else:
            path = Path(folder)
            if path.exists() and any(path.iterdir()) and not (path / MARKER).exists():
                raise CdiSpecError(f"{folder} is not empty and not a simulated driver root (no {MARKER}): "
                                   "nvdp writes a simulated driver root only into an empty folder")
            path.mkdir(parents=True, exist_ok=True)
            self.folder = str(path)
            self._owned = False
        Path(self.folder, MARKER).write_text("a simulated NVIDIA driver root written by nvdp (--simulate)\n")
        self.files_as_nodes = False
        self.ld_cache_by = ""  # "ldconfig" or "nvdp"
        self._version = ""

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _path(self, path: str) -> Path:
        return Path(self.folder, path.lstrip("/"))

    def _write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            data = data.encode()
        target.write_bytes(data)
        target.chmod(mode)

    def _link(self, path: str, target: str) -> None:
        link = self._path(path)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)

    def sync(self, node: Node) -> Roots:
        if node.driver_version != self._version:
            self._driver_files(node.driver_version)
            self._version = node.driver_version
        for path in self._node_paths(node):
            self._device_node(path)
        return Roots(scan_driver=self.folder, scan_dev=self.folder, host_driver=self.folder, host_dev=self.folder,
                     sys=str(self._path("/sys")), files_as_nodes=self.files_as_nodes)

    # --- the driver's files ---------------------------------------------------------------------

    def _driver_files(self, version: str) -> None:
        folder = library_folder()
        for where, (name, suffix) in [*((folder, lib) for lib in LIBRARIES), (f"{folder}/vdpau", VDPAU)]:
            file_name = f"{name}.{version}"
            soname = f"{name}.{suffix}" if suffix else file_name
            self._write(f"{where}/{file_name}", shared_object(soname, f"{NOTE} {file_name}"), 0o755)
            if suffix:
                self._link(f"{where}/{soname}", file_name)
        self._write("/etc/ld.so.conf", f"{folder}\n")
        self._ld_cache(folder, version)
        for binary in BINARIES:
            self._write(f"/usr/bin/{binary}", f"#!/bin/sh\necho '{binary} ({NOTE}, driver {version})'\n", 0o755)
        for firmware in FIRMWARE:
            self._write(f"/lib/firmware/nvidia/{version}/{firmware}", f"{NOTE}: {firmware}\n")
        icd = {"file_format_version": "1.0.1", "ICD": {"library_path": "libGLX_nvidia.so.0", "api_version": "1.4"}}
        self._write("/etc/vulkan/icd.d/nvidia_icd.json", json.dumps(icd, indent=2) + "\n")
        egl = {"file_format_version": "1.0.0", "ICD": {"library_path": "libEGL_nvidia.so.0"}}
        self._write("/usr/share/glvnd/egl_vendor.d/10_nvidia.json", json.dumps(egl, indent=2) + "\n")
        self._write("/etc/OpenCL/vendors/nvidia.icd", "libnvidia-opencl.so.1\n")
        self._socket(PERSISTENCED_SOCKET)

    def _ld_cache(self, folder: str, version: str) -> None:
        """`ldconfig -r` where it can chroot (root); our own writer otherwise."""
        cache = self._path("/etc/ld.so.cache")
        with contextlib.suppress(FileNotFoundError):
            cache.unlink()
        ldconfig = find_ldconfig()
        if ldconfig is not None and os.geteuid() == 0:
            done = subprocess.run([ldconfig, "-r", self.folder], capture_output=True, timeout=30, check=False)
            if done.returncode == 0 and cache.exists():
                self.ld_cache_by = "ldconfig"
                return
        entries = []
        for name, soname in LIBRARIES:
            real = f"{name}.{soname}" if soname else f"{name}.{version}"
            entries.append(ldcache.Entry(real, f"{folder}/{real}"))
        cache.write_bytes(ldcache.encode(entries))
        self.ld_cache_by = "nvdp"

    def _socket(self, path: str) -> None:
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(target))  # the file stays after close; fails only for a path over 107 bytes

    # --- device nodes -------------------------------------------------------------------------

    def _node_paths(self, node: Node) -> list[str]:
        paths = [*node.control_devices]
        for gpu in node.gpus:
            paths.append(gpu.device_path)
            for device in gpu.mig_devices:
                caps, _missing = mig.capability_paths(gpu, device, node.mig_minors)
                paths += caps
        return [*paths, *FEATURE_NODES]

    def _device_node(self, path: str) -> None:
        target = self._path(path)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        if not self.files_as_nodes:
            try:
                os.mknod(target, 0o666 | stat.S_IFCHR, os.stat("/dev/null").st_rdev)
                target.chmod(0o666)
                return
            except PermissionError:
                self.files_as_nodes = True  # not root: plain files stand in for the nodes
        target.write_bytes(b"")
