"""Driver-root scanning (backends/driver_root.py), the ld cache format (backends/ldcache.py), the
simulated driver root and the atomic spec files, on folders under tmp_path."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from nvdp.backends import ldcache
from nvdp.backends.driver_root import Roots, find_libraries, resolve, roots_for, scan
from nvdp.backends.simulated.driver_root import MARKER, SimulatedDriverRoot, find_ldconfig, library_folder
from nvdp.backends.simulated.elf import shared_object
from nvdp.backends.simulated.expand import build_node
from nvdp.backends.simulated.profile import load_profile
from nvdp.backends.spec_files import sync_folder, write_atomically
from nvdp.config.load import load
from nvdp.core.cdi import Library
from nvdp.errors import CdiSpecError

VERSION = "580.95.05"
LIB = "/usr/lib/x86_64-linux-gnu"
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, ldconfig -r's chroot)")


def put(path: Path, data: bytes | str = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def driver_root(root: Path, folder: str = LIB, cache: bool = True) -> Path:
    """A driver root with libcuda and libnvidia-ml at VERSION, their soname links, a vdpau
    library, an unrelated library and (optionally) an ld cache written in glibc's format."""
    lib = root / folder.lstrip("/")
    for name, soname in (("libcuda.so", "1"), ("libnvidia-ml.so", "1")):
        put(lib / f"{name}.{VERSION}")
        (lib / f"{name}.{soname}").symlink_to(f"{name}.{VERSION}")
    (lib / "libcuda.so").symlink_to("libcuda.so.1")  # the dev link: not a soname
    put(lib / f"vdpau/libvdpau_nvidia.so.{VERSION}")
    (lib / "vdpau/libvdpau_nvidia.so.1").symlink_to(f"libvdpau_nvidia.so.{VERSION}")
    put(lib / "libz.so.1.2.13")
    put(lib / "libnvidia-ml.so.470.1")  # another driver version: not ours
    if cache:
        entries = [ldcache.Entry("libcuda.so.1", f"{folder}/libcuda.so.1"),
                   ldcache.Entry("libnvidia-ml.so.1", f"{folder}/libnvidia-ml.so.1"),
                   ldcache.Entry("libz.so.1", f"{folder}/libz.so.1.2.13"),
                   ldcache.Entry("libcuda.so.1", "/usr/lib32/libcuda.so.1", flags=0x0003)]  # 32-bit: ignored
        put(root / "etc/ld.so.cache", ldcache.encode(entries))
    return root


# --- the ld cache ------------------------------------------------------------------------------


def test_ld_cache_round_trip_and_64_bit_filter() -> None:
    entries = [ldcache.Entry("libcuda.so.1", "/usr/lib64/libcuda.so.1"),
               ldcache.Entry("libcuda.so.1", "/usr/lib/libcuda.so.1", flags=0x0003)]
    parsed = ldcache.parse(ldcache.encode(entries))
    assert sorted(parsed, key=lambda e: e.path) == sorted(entries, key=lambda e: e.path)
    assert [e.is_64bit for e in parsed if e.path.startswith("/usr/lib64")] == [True]
    assert [e.is_64bit for e in parsed if e.path.startswith("/usr/lib/")] == [False]


def test_this_machines_ld_cache_parses() -> None:
    cache = Path("/etc/ld.so.cache")
    if not cache.exists():
        pytest.skip("this machine has no /etc/ld.so.cache")
    entries = ldcache.parse(cache.read_bytes())
    assert entries and all(e.path.startswith("/") and e.soname for e in entries)
    assert any(e.soname.startswith("libc.so.") for e in entries)


@AS_ROOT
def test_a_cache_made_by_ldconfig_r_parses(tmp_path: Path) -> None:
    ldconfig = find_ldconfig()
    if ldconfig is None:
        pytest.skip("no ldconfig on this machine")
    lib = tmp_path / "usr/lib64"
    put(lib / "libnvdp-test.so.9.9", shared_object("libnvdp-test.so.9"))
    put(tmp_path / "etc/ld.so.conf", "/usr/lib64\n")
    subprocess.run([ldconfig, "-r", str(tmp_path)], check=True, capture_output=True)
    entries = ldcache.parse((tmp_path / "etc/ld.so.cache").read_bytes())
    assert ldcache.Entry("libnvdp-test.so.9", "/usr/lib64/libnvdp-test.so.9", 0x0303) in entries
    assert (lib / "libnvdp-test.so.9").is_symlink()  # ldconfig made the soname link: it read our ELF file


def _old_format(entries: list[tuple[str, str]], then: bytes = b"") -> bytes:
    strings = bytearray()
    table = b""
    for soname, path in entries:
        key = len(strings)
        strings += soname.encode() + b"\0"
        value = len(strings)
        strings += path.encode() + b"\0"
        table += struct.pack("<iII", 0x0303, key, value)
    data = ldcache.OLD_MAGIC + b"\0" + struct.pack("<I", len(entries)) + table + bytes(strings)
    if then:
        data += b"\0" * (-len(data) % 8) + then
    return data


def test_old_format_and_the_new_format_hidden_after_it() -> None:
    old = _old_format([("libold.so.1", "/lib/libold.so.1")])
    assert ldcache.parse(old) == [ldcache.Entry("libold.so.1", "/lib/libold.so.1", 0x0303)]
    both = _old_format([("libold.so.1", "/lib/libold.so.1")], ldcache.encode([ldcache.Entry("libnew.so.1", "/l/n")]))
    assert ldcache.parse(both) == [ldcache.Entry("libnew.so.1", "/l/n")]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", "unknown format", id="empty"),
        pytest.param(b"\x7fELF" + bytes(60), "unknown format", id="not a cache"),
        pytest.param(ldcache.NEW_MAGIC + bytes(4), "truncated header", id="truncated"),
        pytest.param(ldcache.encode([ldcache.Entry("a", "/a")])[:60], "entries", id="entries cut off"),
        pytest.param(ldcache.encode([ldcache.Entry("a", "/a")])[:-3], "outside the file", id="strings cut off"),
        pytest.param(ldcache.NEW_MAGIC + struct.pack("<IIB3xI12x", 0, 0, 1, 0), "endianness", id="bad endianness"),
        pytest.param(ldcache.OLD_MAGIC + b"\0" + struct.pack("<I", 1000), "too short", id="old format cut off"),
    ],
)
def test_malformed_caches_say_why(data: bytes, message: str) -> None:
    with pytest.raises(ldcache.LdCacheError, match=message):
        ldcache.parse(data)


# --- libraries ---------------------------------------------------------------------------------


def test_libraries_through_the_ld_cache(tmp_path: Path) -> None:
    root = driver_root(tmp_path)
    assert find_libraries(str(root), VERSION) == (
        Library(f"{LIB}/libcuda.so.{VERSION}", ("libcuda.so.1",)),
        Library(f"{LIB}/libnvidia-ml.so.{VERSION}", ("libnvidia-ml.so.1",)),
        Library(f"{LIB}/vdpau/libvdpau_nvidia.so.{VERSION}", ("libvdpau_nvidia.so.1",)),
    )


def test_libraries_without_an_ld_cache_come_from_the_standard_folders(tmp_path: Path) -> None:
    root = driver_root(tmp_path, folder="/usr/lib64", cache=False)
    assert [lib.path for lib in find_libraries(str(root), VERSION)] == [
        f"/usr/lib64/libcuda.so.{VERSION}", f"/usr/lib64/libnvidia-ml.so.{VERSION}",
        f"/usr/lib64/vdpau/libvdpau_nvidia.so.{VERSION}"]


def test_links_are_followed_inside_the_root(tmp_path: Path) -> None:
    """An absolute link in a driver root names a path in that root, never this machine's."""
    root = driver_root(tmp_path, folder="/opt/driver/lib", cache=False)
    (root / "usr").mkdir(exist_ok=True)
    (root / "usr/lib64").symlink_to("/opt/driver/lib")  # absolute: resolved in the root
    assert resolve(str(root), "/usr/lib64/libcuda.so.1") == f"/opt/driver/lib/libcuda.so.{VERSION}"
    assert resolve(str(root), "/usr/lib64/missing.so") is None
    (root / "loop").symlink_to("loop")
    assert resolve(str(root), "/loop") is None
    libs = find_libraries(str(root), VERSION)  # found through /usr/lib64, named by where they really are
    assert libs[0] == Library(f"/opt/driver/lib/libcuda.so.{VERSION}", ("libcuda.so.1",))


def test_explicit_driver_libraries_feature_flag(tmp_path: Path) -> None:
    root = driver_root(tmp_path)
    put(root / f"{LIB.lstrip('/')}/libnvidia-egl-gbm.so.1.1.2")
    assert f"{LIB}/libnvidia-egl-gbm.so.1.1.2" not in [lib.path for lib in find_libraries(str(root), VERSION)]
    assert f"{LIB}/libnvidia-egl-gbm.so.1.1.2" in [lib.path for lib in find_libraries(str(root), VERSION, True)]


def test_a_driver_root_without_libraries_names_the_root(tmp_path: Path) -> None:
    (tmp_path / "usr/lib64").mkdir(parents=True)
    with pytest.raises(CdiSpecError, match=f"no NVIDIA driver libraries \\(lib\\*.so.{VERSION}\\) under the driver "
                                           f"root {tmp_path}"):
        find_libraries(str(tmp_path), VERSION)
    put(tmp_path / "etc/ld.so.cache", ldcache.encode([ldcache.Entry("libz.so.1", "/usr/lib64/libz.so.1")]))
    with pytest.raises(CdiSpecError, match=f"searched {tmp_path}/etc/ld.so.cache"):
        find_libraries(str(tmp_path), VERSION)


def test_an_unreadable_ld_cache_names_the_file(tmp_path: Path) -> None:
    root = driver_root(tmp_path)
    (root / "etc/ld.so.cache").write_bytes(b"garbage")
    with pytest.raises(CdiSpecError, match=f"cannot parse the ld cache {root}/etc/ld.so.cache: unknown format"):
        find_libraries(str(root), VERSION)
    (root / "etc/ld.so.cache").unlink()
    (root / "etc/ld.so.cache").mkdir()  # unreadable even for root
    with pytest.raises(CdiSpecError, match=f"cannot read the ld cache {root}/etc/ld.so.cache: Is a directory"):
        find_libraries(str(root), VERSION)


# --- the rest of a driver root -----------------------------------------------------------------


def test_scan_finds_binaries_firmware_sockets_configs_and_control_nodes(tmp_path: Path) -> None:
    node = build_node(*load_profile("h200"))
    root = driver_root(tmp_path)  # its ld cache names VERSION's files: the folders are searched instead
    version = node.driver_version
    for lib in ("libcuda.so", "libnvidia-ml.so"):
        put(root / f"{LIB.lstrip('/')}/{lib}.{version}")
    put(root / "usr/bin/nvidia-smi").chmod(0o755)
    put(root / "bin/nvidia-smi")  # a second copy further down the search order: not mounted twice
    put(root / "usr/sbin/nvidia-persistenced")
    put(root / f"lib/firmware/nvidia/{version}/gsp_ga10x.bin")
    put(root / f"lib/firmware/nvidia/{version}/README")
    put(root / "etc/vulkan/icd.d/nvidia_icd.json", "{}")
    put(root / "etc/OpenCL/vendors/nvidia.icd", "libnvidia-opencl.so.1\n")
    (root / "run/nvidia-persistenced").mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "run/nvidia-persistenced/socket"))
    (root / "var").mkdir()
    (root / "var/run").symlink_to("../run")  # the same socket under /var/run: listed once
    put(root / "run/nvidia-fabricmanager/socket")  # a plain file, not a socket: left out
    put(root / "dev/nvidiactl")  # plain files, not device nodes: left out on a real root
    facts = scan(Roots(str(root), str(root), "/", "/"), node)
    assert facts.version == version
    assert [lib.path for lib in facts.libraries] == [f"{LIB}/libcuda.so.{version}", f"{LIB}/libnvidia-ml.so.{version}"]
    assert facts.binaries == ("/usr/bin/nvidia-smi", "/usr/sbin/nvidia-persistenced")
    assert facts.firmware == (f"/lib/firmware/nvidia/{version}/gsp_ga10x.bin",)
    assert facts.ipc_sockets == ("/run/nvidia-persistenced/socket",)
    assert facts.config_files == ("/etc/vulkan/icd.d/nvidia_icd.json", "/etc/OpenCL/vendors/nvidia.icd")
    assert facts.control_nodes == ()
    # A simulated root made without root privileges: plain files stand for nodes.
    assert scan(Roots(str(root), str(root), "/", "/", files_as_nodes=True), node).control_nodes == ("/dev/nvidiactl",)


def test_scan_errors_name_the_path(tmp_path: Path) -> None:
    node = build_node(*load_profile("h200"))
    with pytest.raises(CdiSpecError, match=f"the driver root {tmp_path}/nope is not a folder"):
        scan(Roots(str(tmp_path / "nope"), "/", "/", "/"), node)
    from dataclasses import replace

    with pytest.raises(CdiSpecError, match="driver version is unknown"):
        scan(Roots(str(tmp_path), "/", "/", "/"), replace(node, driver_version=""))


@AS_ROOT
def test_drm_and_feature_nodes_from_sysfs_and_the_dev_root(tmp_path: Path) -> None:
    node = build_node(*load_profile("h200"))
    root = driver_root(tmp_path / "driver")
    for lib in ("libcuda.so", "libnvidia-ml.so"):
        put(root / f"{LIB.lstrip('/')}/{lib}.{node.driver_version}")
    dev, sys = tmp_path / "host", tmp_path / "sys"
    (sys / "bus/pci/devices/0000:00:06.0/drm/card1").mkdir(parents=True)
    (sys / "bus/pci/devices/0000:00:06.0/drm/renderD128").mkdir(parents=True)
    null = os.stat("/dev/null").st_rdev
    nodes = (("dev/dri/card1", 0o660, 44), ("dev/dri/renderD128", 0o666, 109), ("dev/nvidia-fs0", 0o666, 0),
             ("dev/infiniband/uverbs0", 0o666, 0), ("dev/nvidia-caps-imex-channels/channel0", 0o666, 0))
    for path, mode, gid in nodes:
        (dev / path).parent.mkdir(parents=True, exist_ok=True)
        os.mknod(dev / path, mode | stat.S_IFCHR, null)
        os.chown(dev / path, 0, gid)
        os.chmod(dev / path, mode)
    put(root / "etc/cufile.json", "{}")
    facts = scan(Roots(str(root), str(dev), "/", "/", sys=str(sys)), node, ("gds", "mofed", "gdrcopy"), (0,))
    drm = facts.drm[node.gpus[0].uuid]
    assert (drm.bus_id, drm.card, drm.render, drm.gids) == ("0000:00:06.0", "/dev/dri/card1", "/dev/dri/renderD128",
                                                            (44,))  # the render node is world-usable: no group
    assert facts.feature_nodes == {"gds": ("/dev/nvidia-fs0",), "mofed": ("/dev/infiniband/uverbs0",)}
    assert facts.feature_mounts == {"gds": ("/etc/cufile.json",)}
    assert facts.imex_channels == {0: "/dev/nvidia-caps-imex-channels/channel0"}


def test_roots_follow_the_official_daemonset_layout(tmp_path: Path) -> None:
    cfg = load({"driver_root": "/run/nvidia/driver", "container_driver_root": str(tmp_path)}, {})
    assert roots_for(cfg) == Roots(str(tmp_path), str(tmp_path), "/run/nvidia/driver", "/run/nvidia/driver")
    cfg = load({"driver_root": "/run/nvidia/driver", "dev_root": "/", "container_driver_root": str(tmp_path)}, {})
    assert roots_for(cfg) == Roots(str(tmp_path), "/", "/run/nvidia/driver", "/")
    cfg = load({"container_driver_root": str(tmp_path / "absent")}, {})  # on the host itself
    assert roots_for(cfg) == Roots("/", "/", "/", "/")


# --- the simulated driver root -----------------------------------------------------------------


def test_the_simulated_root_scans_like_a_driver_root(tmp_path: Path) -> None:
    node = build_node(*load_profile("a100-mig-mixed"))
    sim = SimulatedDriverRoot(str(tmp_path / "sim"))
    roots = sim.sync(node)
    facts = scan(roots, node, ("gds", "mofed", "gdrcopy"), (0,))
    names = [os.path.basename(lib.path) for lib in facts.libraries]
    assert f"libcuda.so.{node.driver_version}" in names and f"libvdpau_nvidia.so.{node.driver_version}" in names
    cuda = next(lib for lib in facts.libraries if lib.path.endswith(f"libcuda.so.{node.driver_version}"))
    assert cuda.links == ("libcuda.so.1",) and cuda.folder == library_folder()
    assert len(facts.binaries) == 5 and len(facts.firmware) == 2 and facts.ipc_sockets
    assert facts.control_nodes == node.control_devices
    assert set(facts.feature_nodes) == {"gds", "mofed", "gdrcopy"} and facts.imex_channels
    assert sim.ld_cache_by == ("ldconfig" if os.geteuid() == 0 and find_ldconfig() else "nvdp")
    mig = node.gpus[0].mig_devices[0]
    from nvdp.core.mig import capability_paths

    caps, _ = capability_paths(node.gpus[0], mig, node.mig_minors)
    node_file = tmp_path / "sim" / caps[0].lstrip("/")
    assert node_file.exists() and (stat.S_ISCHR(node_file.stat().st_mode) == (not sim.files_as_nodes))
    sim.close()
    assert (tmp_path / "sim" / MARKER).exists()  # a folder the caller named is kept


def test_the_simulated_root_never_writes_into_a_real_folder(tmp_path: Path) -> None:
    put(tmp_path / "real/usr/lib64/libcuda.so.1")
    with pytest.raises(CdiSpecError, match="not empty and not a simulated driver root"):
        SimulatedDriverRoot(str(tmp_path / "real"))
    temporary = SimulatedDriverRoot()
    folder = temporary.folder
    temporary.close()
    assert not os.path.exists(folder)


# --- spec files --------------------------------------------------------------------------------


def test_atomic_write_mode_and_rewrite_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "cdi/k8s.device-plugin.nvidia.com-gpu.json"
    old_umask = os.umask(0o077)  # the file mode must not depend on the process umask
    try:
        assert write_atomically(str(path), "one\n") is True
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_text() == "one\n"
    inode = path.stat().st_ino
    assert write_atomically(str(path), "one\n") is False
    assert path.stat().st_ino == inode  # untouched
    assert write_atomically(str(path), "two\n") is True
    assert path.stat().st_ino != inode and path.read_text() == "two\n"  # replaced by a rename, not rewritten
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_a_spec_folder_that_cannot_be_written_names_it(tmp_path: Path) -> None:
    put(tmp_path / "file")
    with pytest.raises(CdiSpecError, match=f"cannot write CDI specs in {tmp_path}/file/cdi"):
        write_atomically(str(tmp_path / "file/cdi/spec.json"), "x")


def test_sync_removes_only_our_stale_files(tmp_path: Path) -> None:
    put(tmp_path / "k8s.device-plugin.nvidia.com-gds.json", "old")
    put(tmp_path / "nvidia.yaml", "someone else's")
    done = sync_folder(str(tmp_path), [("k8s.device-plugin.nvidia.com-gpu.json", "{}\n")],
                       ["k8s.device-plugin.nvidia.com-gpu.json", "k8s.device-plugin.nvidia.com-gds.json"])
    assert done.written == (str(tmp_path / "k8s.device-plugin.nvidia.com-gpu.json"),)
    assert done.removed == (str(tmp_path / "k8s.device-plugin.nvidia.com-gds.json"),)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k8s.device-plugin.nvidia.com-gpu.json", "nvidia.yaml"]
    shutil.rmtree(tmp_path)
