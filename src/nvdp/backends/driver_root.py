"""Scan a driver root and a dev root for what a CDI spec mounts: `DriverFacts` for `core.cdi`.

The driver root is where the NVIDIA driver's user-space files are, as this process sees them:
`/driver-root` in the official DaemonSet (the host's `--driver-root` mounted there), or the host
root itself. Libraries are found through `<root>/etc/ld.so.cache` (64-bit entries whose file, after
following links inside the root, is `lib*.so.<driver version>`), then every such file in the same
folders and their `vdpau/` subfolder; without an ld cache, in the standard library folders.
Paths in the result are inside the roots (`/usr/lib/...`, `/dev/...`); `core.cdi` turns them into
host paths. Errors name the path: a missing driver root, an ld cache that cannot be read or
parsed, a root without the driver's libraries (`CdiSpecError`).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from nvdp.backends import ldcache
from nvdp.config import cdi as names
from nvdp.config.options import Config
from nvdp.core.cdi import DriverFacts, DrmNodes, Library
from nvdp.core.devices import Node
from nvdp.core.topology import bus_key
from nvdp.errors import CdiSpecError

LD_CACHE = "/etc/ld.so.cache"
# Searched in this order without an ld cache; /usr/lib and /lib only when none of these has a match
# (on RPM systems they hold the 32-bit libraries).
LIBRARY_FOLDERS = ("/usr/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib64",
                   "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")
FALLBACK_FOLDERS = ("/usr/lib", "/lib")
BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
            "nvidia-cuda-mps-server")
BINARY_FOLDERS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin")
FIRMWARE_FOLDERS = ("/lib/firmware/nvidia", "/usr/lib/firmware/nvidia")
IPC_SOCKETS = ("/run/nvidia-persistenced/socket", "/run/nvidia-fabricmanager/socket")
CONFIG_FILES = (
    "/etc/vulkan/icd.d/nvidia_icd.json",
    "/etc/vulkan/implicit_layer.d/nvidia_layers.json",
    "/usr/share/vulkan/icd.d/nvidia_icd.json",
    "/usr/share/vulkan/implicit_layer.d/nvidia_layers.json",
    "/usr/share/glvnd/egl_vendor.d/10_nvidia.json",
    "/usr/share/egl/egl_external_platform.d/10_nvidia_wayland.json",
    "/usr/share/egl/egl_external_platform.d/15_nvidia_gbm.json",
    "/etc/OpenCL/vendors/nvidia.icd",
    "/usr/share/nvidia/nvoptix.bin",
)
CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
FEATURE_NODES = {
    "gds": ("/dev", re.compile(r"nvidia-fs\d*")),
    "mofed": ("/dev/infiniband", re.compile(r"uverbs\d+|rdma_cm")),
    "gdrcopy": ("/dev", re.compile(r"gdrdrv")),
}
GDS_MOUNTS = ("/etc/cufile.json", "/run/udev")
IMEX_FOLDER = "/dev/nvidia-caps-imex-channels"
# Libraries the toolkit adds with enable-explicit-driver-libraries: versioned apart from the driver.
EXPLICIT_LIBRARIES = re.compile(r"libnvidia-egl-(gbm|wayland2?|xcb|xlib)\.so\.\d[\d.]*")


@dataclass(frozen=True)
class Roots:
    """Where this process reads the driver and /dev (scan_*) and what the spec calls them (host_*)."""

    scan_driver: str
    scan_dev: str
    host_driver: str
    host_dev: str
    sys: str = "/sys"
    # A simulated root made without root privileges holds plain files where device nodes would be.
    files_as_nodes: bool = False


@runtime_checkable
class DriverRootSource(Protocol):
    """A backend that brings its own driver root (the simulated node)."""

    def driver_roots(self, node: Node) -> Roots: ...


def roots_for(cfg: Config) -> Roots:
    """The official DaemonSet's layout: the host's driver root mounted at --driver-root-ctr-path
    (read from there when it exists, else from --driver-root itself, as on the host); the dev root
    is read with the driver root when they are the same folder, else from this process's /."""
    container = cfg.container_driver_root
    scan = container if container and os.path.isdir(container) else cfg.driver_root
    scan_dev = scan if cfg.dev_root == cfg.driver_root else "/"
    return Roots(scan_driver=scan, scan_dev=scan_dev, host_driver=cfg.driver_root, host_dev=cfg.dev_root)


def _join(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def resolve(root: str, path: str, hops: int = 40) -> str | None:
    """`path` inside `root` with every link followed inside the root (an absolute link target
    names a path in the root, not on this machine); None when it does not exist."""
    pending = [p for p in path.split("/") if p]
    done: list[str] = []
    while pending:
        part = pending.pop(0)
        if part in (".", ""):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        full = _join(root, "/".join([*done, part]))
        if os.path.islink(full):
            hops -= 1
            if hops < 0:
                return None
            target = os.readlink(full)
            if target.startswith("/"):
                done = []
            pending = [p for p in target.split("/") if p] + pending
            continue
        done.append(part)
    found = "/" + "/".join(done)
    return found if os.path.lexists(_join(root, found)) else None


def _is_driver_library(name: str, version: str) -> bool:
    return name.startswith("lib") and name.endswith(f".so.{version}")


def _ld_cache_entries(root: str) -> list[ldcache.Entry] | None:
    """The 64-bit entries of the root's ld cache; None when it has none."""
    path = _join(root, LD_CACHE)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CdiSpecError(f"cannot read the ld cache {path}: {exc.strerror}") from exc
    try:
        entries = ldcache.parse(data)
    except ldcache.LdCacheError as exc:
        raise CdiSpecError(f"cannot parse the ld cache {path}: {exc}") from exc
    return [e for e in entries if e.is_64bit]


def _listdir(root: str, folder: str) -> tuple[str, list[str]]:
    """The folder as it really is in the root (links followed inside it) and its entries, sorted."""
    real = resolve(root, folder)
    if real is None:
        return folder, []
    try:
        return real, sorted(os.listdir(_join(root, real)))
    except OSError:
        return real, []


def _folder_links(root: str, folder: str, files: Iterable[str]) -> dict[str, set[str]]:
    """Soname-style links (`libX.so.N`) in a folder that point at one of `files`."""
    links: dict[str, set[str]] = {f: set() for f in files}
    real, entries = _listdir(root, folder)
    for name in entries:
        path = f"{real}/{name}"
        if not re.fullmatch(r"lib.+\.so\.\d+", name) or not os.path.islink(_join(root, path)):
            continue
        target = resolve(root, path)
        if target in links and os.path.basename(target) != name:
            links[target].add(name)
    return links


def _matching(root: str, folder: str, pattern: re.Pattern[str] | None, version: str) -> list[str]:
    """Files (not links) in the folder named lib*.so.<version>, or matching `pattern`; real paths."""
    real, entries = _listdir(root, folder)
    found = []
    for name in entries:
        wanted = pattern.fullmatch(name) if pattern else _is_driver_library(name, version)
        path = f"{real}/{name}"
        if wanted and not os.path.islink(_join(root, path)) and os.path.isfile(_join(root, path)):
            found.append(path)
    return found


def find_libraries(root: str, version: str, explicit: bool = False) -> tuple[Library, ...]:
    """The driver's libraries at `version` under `root` (see the module text)."""
    entries = _ld_cache_entries(root)
    links: dict[str, set[str]] = {}
    if entries is not None:
        for entry in entries:
            real = resolve(root, entry.path)
            if real is not None and _is_driver_library(os.path.basename(real), version):
                names_ = links.setdefault(real, set())
                if entry.soname != os.path.basename(real):
                    names_.add(entry.soname)
    folders = sorted({os.path.dirname(p) for p in links})
    if not folders:  # no ld cache, or one that names none of this version's files (ldconfig not rerun)
        folders = [f for f in LIBRARY_FOLDERS if _matching(root, f, None, version)]
        folders = folders or [f for f in FALLBACK_FOLDERS if _matching(root, f, None, version)]
        folders = list(dict.fromkeys(_listdir(root, f)[0] for f in folders))  # /lib64 -> usr/lib64: once
    for folder in folders:
        for where in (folder, f"{folder}/vdpau"):
            files = _matching(root, where, None, version)
            if explicit and where == folder:
                files += _matching(root, where, EXPLICIT_LIBRARIES, version)
            for path, found in _folder_links(root, where, files).items():
                links.setdefault(path, set()).update(found)
    if not links:
        searched = ", ".join(_join(root, f) for f in (*([LD_CACHE] if entries is not None else []),
                                                      *LIBRARY_FOLDERS, *FALLBACK_FOLDERS))
        raise CdiSpecError(f"no NVIDIA driver libraries (lib*.so.{version}) under the driver root {root} "
                           f"(searched {searched}); set --driver-root to where the driver is installed")
    return tuple(Library(p, tuple(sorted(n))) for p, n in sorted(links.items()))


def _first_existing(root: str, paths: Sequence[str], want: int = stat.S_IFREG) -> list[str]:
    """The real paths (links followed inside the root) of those of `paths` that exist there as
    `want` (a file, socket or folder), each once (`/var/run` is often `/run`, `/bin` `/usr/bin`)."""
    found: list[str] = []
    for path in paths:
        real = resolve(root, path)
        if real is None or real in found:
            continue
        try:
            mode = os.stat(_join(root, real)).st_mode
        except OSError:
            continue
        if stat.S_IFMT(mode) == want:
            found.append(real)
    return found


def find_binaries(root: str) -> tuple[str, ...]:
    found = []
    for binary in BINARIES:
        hits = _first_existing(root, [f"{folder}/{binary}" for folder in BINARY_FOLDERS])
        found += hits[:1]
    return tuple(found)


def find_firmware(root: str, version: str) -> tuple[str, ...]:
    for folder in FIRMWARE_FOLDERS:
        real, entries = _listdir(root, f"{folder}/{version}")
        files = [f"{real}/{n}" for n in entries if re.fullmatch(r"gsp.*\.bin", n)]
        if files:
            return tuple(files)
    return ()


def _names(root: str, folder: str) -> list[str]:
    try:
        return sorted(os.listdir(_join(root, folder)))
    except OSError:
        return []


def find_sockets(root: str) -> tuple[str, ...]:
    paths = [p for s in IPC_SOCKETS for p in (s, "/var" + s)]
    return tuple(_first_existing(root, paths, stat.S_IFSOCK))


def _char_devices(dev_root: str, paths: Iterable[str], files_as_nodes: bool = False) -> tuple[str, ...]:
    found = []
    for path in paths:
        try:
            mode = os.stat(_join(dev_root, path)).st_mode
        except OSError:
            continue
        if stat.S_ISCHR(mode) or (files_as_nodes and stat.S_ISREG(mode)):
            found.append(path)
    return tuple(found)


def find_drm(sys_root: str, dev_root: str, node: Node) -> dict[str, DrmNodes]:
    """Each GPU's DRM card and render nodes, from sysfs's `<bus>/drm/` and the dev root."""
    result = {}
    for gpu in node.gpus:
        bus = bus_key(gpu.pci_bus_id)
        entries = _names(os.path.join(sys_root, "bus/pci/devices", bus), "drm")
        card = next((f"/dev/dri/{n}" for n in entries if re.fullmatch(r"card\d+", n)), None)
        render = next((f"/dev/dri/{n}" for n in entries if re.fullmatch(r"renderD\d+", n)), None)
        present = _char_devices(dev_root, [n for n in (card, render) if n])
        if not present:
            continue
        gids = []
        for path in present:
            info = os.stat(_join(dev_root, path))
            if info.st_mode & 0o006 != 0o006:  # others cannot open it: the container needs the group
                gids.append(info.st_gid)
        result[gpu.uuid] = DrmNodes(bus, card if card in present else None, render if render in present else None,
                                    tuple(gids))
    return result


def find_feature_nodes(dev_root: str, classes: Iterable[str], files_as_nodes: bool = False
                       ) -> dict[str, tuple[str, ...]]:
    found = {}
    for cls in classes:
        folder, pattern = FEATURE_NODES[cls]
        candidates = [f"{folder}/{n}" for n in _names(dev_root, folder) if pattern.fullmatch(n)]
        nodes = _char_devices(dev_root, candidates, files_as_nodes)
        if nodes:
            found[cls] = nodes
    return found


def find_imex_channels(dev_root: str, channel_ids: Iterable[int], files_as_nodes: bool = False) -> dict[int, str]:
    wanted = {c: f"{IMEX_FOLDER}/channel{c}" for c in channel_ids}
    present = set(_char_devices(dev_root, wanted.values(), files_as_nodes))
    return {c: p for c, p in wanted.items() if p in present}


def scan(roots: Roots, node: Node, features: Iterable[str] = (), imex_channel_ids: Iterable[int] = (),
         feature_flags: Iterable[str] = ()) -> DriverFacts:
    """Everything the spec needs from the roots, for this node's driver version."""
    root = roots.scan_driver
    if not os.path.isdir(root):
        raise CdiSpecError(f"the driver root {root} is not a folder")
    if not node.driver_version:
        raise CdiSpecError("the driver version is unknown (NVML gave none): the driver's libraries cannot be named")
    version = node.driver_version
    classes = [c for c in features if c in FEATURE_NODES]
    files_ok = roots.files_as_nodes
    feature_nodes = find_feature_nodes(roots.scan_dev, classes, files_ok)
    mounts: Mapping[str, tuple[str, ...]] = {}
    if "gds" in feature_nodes:
        gds = _first_existing(root, GDS_MOUNTS[:1]) + _first_existing(root, GDS_MOUNTS[1:], stat.S_IFDIR)
        mounts = {"gds": tuple(gds)} if gds else {}
    return DriverFacts(
        version=version,
        libraries=find_libraries(root, version, explicit=names.EXPLICIT_DRIVER_LIBRARIES in set(feature_flags)),
        binaries=find_binaries(root),
        firmware=find_firmware(root, version),
        ipc_sockets=find_sockets(root),
        config_files=tuple(_first_existing(root, CONFIG_FILES)),
        control_nodes=_char_devices(roots.scan_dev, CONTROL_NODES, files_ok),
        drm=find_drm(roots.sys, roots.scan_dev, node),
        feature_nodes=feature_nodes,
        feature_mounts=mounts,
        imex_channels=find_imex_channels(roots.scan_dev, imex_channel_ids, files_ok),
    )
