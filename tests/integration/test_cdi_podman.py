"""A real CDI consumer reads the specs nvdp writes: podman 4.3 with runc, a busybox-static rootfs.

podman reads specs only from /etc/cdi and /var/run/cdi, so each test writes there under a vendor
of its own (`nvdp-test-<random>.example.com`: no clash with a real plugin's spec or another test's)
and removes its file afterwards. The specs come from the same code path the plugin uses
(`app.cdi.generate` + `app.cdi.write`) for a simulated node whose driver root and dev root the
simulated backend made: as root its device nodes are character devices with /dev/null's numbers,
so podman finds real device nodes at every hostPath. The hook path points at a script that logs
its arguments, so the test sees the createContainer hooks run in the spec's order.

The tools come from scripts/install-container-tools (apt) when missing; the tests are skipped only
when neither podman nor apt-get is there, or when not running as root (podman reads specs only from
root-owned folders, and the simulated device nodes need mknod), and the skip says which.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nvdp.app import cdi as app_cdi
from nvdp.app.discovery import open_backend
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.backends.simulated.driver_root import NOTE, library_folder
from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.core.cdi import CLASSES, SpecSet
from nvdp.core.container import CDI_VENDOR
from nvdp.testing import FakeKubelet
from tests.conftest import running_plugin

ROOT = Path(__file__).resolve().parents[2]
SPEC_DIR = Path("/var/run/cdi")
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "cat", "env", "test", "grep", "echo", "wc", "sort")
VERSION = "580.159.04"  # the simulated profiles' driver version


def _is_static(path: Path) -> bool:
    """No PT_INTERP program header: the binary runs in a rootfs without a dynamic loader."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def _tools_missing() -> str | None:
    return next((t for t in ("podman", "runc") if shutil.which(t) is None), None) or (
        None if BUSYBOX.exists() and _is_static(BUSYBOX) else "busybox-static")


@pytest.fixture(scope="session")
def container_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: podman reads CDI specs only from /etc/cdi and /var/run/cdi, and the simulated "
                    "device nodes are made with mknod")
    missing = _tools_missing()
    if missing is None:
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"{missing} is not installed and there is no apt-get to install it "
                    "(scripts/install-container-tools)")
    done = subprocess.run([str(ROOT / "scripts/install-container-tools")], capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0 and _tools_missing() is None, (
        f"install-container-tools failed:\n{done.stdout}{done.stderr}")


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    return root


@dataclass
class Podman:
    rootfs: Path

    def run(self, devices: list[str], script: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
        """`podman run` as tools.md found it works in this VM: runc, explicit ulimits, --rootfs last."""
        command = ["podman", *(["--log-level=debug"] if debug else []), "--runtime", "runc", "run", "--rm",
                   "--network=none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
        for device in devices:
            command += ["--device", device]
        command += ["--rootfs", str(self.rootfs), "/bin/sh", "-c", script]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def podman(container_tools: None, rootfs: Path) -> Podman:
    return Podman(rootfs)


@dataclass
class Written:
    """One simulated node's specs under a vendor of the test's own, in /var/run/cdi."""

    cfg: Config
    backend: SimulatedBackend
    specs: SpecSet
    vendor: str
    hook_log: Path

    @property
    def gpu_file(self) -> Path:
        return SPEC_DIR / f"{self.vendor}-gpu.json"

    def name(self, device: str, cls: str = "gpu") -> str:
        return f"{self.vendor}/{cls}={device}"

    def hooks_run(self) -> list[str]:
        return self.hook_log.read_text().splitlines() if self.hook_log.exists() else []

    def regenerate(self) -> None:
        self.specs = app_cdi.generate(self.cfg, self.backend.discover(), self.backend, self.vendor)
        app_cdi.write(str(SPEC_DIR), self.specs, self.vendor)


@pytest.fixture
def write_spec(container_tools: None, tmp_path: Path) -> Iterator[Callable[..., Written]]:
    made: list[Written] = []

    def write(profile: str, **cli: Any) -> Written:
        hook_log = tmp_path / "hooks.log"
        hook = tmp_path / "nvidia-ctk"  # named so: the spec calls it as `nvidia-ctk hook <name> ...`
        hook.write_text(f"#!/bin/sh\necho \"$*\" >> {hook_log}\n")
        hook.chmod(0o755)
        cfg = load({"simulate": profile, "device_list_strategy": "cdi-cri", "nvidia_cdi_hook_path": str(hook),
                    "cdi_spec_dir": str(SPEC_DIR), **cli}, {})
        backend = open_backend(cfg)
        assert isinstance(backend, SimulatedBackend)
        vendor = f"nvdp-test-{uuid.uuid4().hex[:8]}.example.com"
        written = Written(cfg, backend, SpecSet(()), vendor, hook_log)
        made.append(written)
        written.regenerate()
        return written

    yield write
    for w in made:
        for cls in CLASSES:
            (SPEC_DIR / f"{w.vendor}-{cls}.json").unlink(missing_ok=True)
        w.backend.close()


def test_a_gpu_by_uuid_gets_its_node_the_driver_files_and_the_hooks(podman: Podman, write_spec: Callable[..., Written]
                                                                    ) -> None:
    spec = write_spec("dgx-h100")
    gpu = spec.backend.node.gpus[3]
    lib = f"{library_folder()}/libcuda.so.{VERSION}"
    result = podman.run([spec.name(gpu.uuid)], f"""
        ls /dev | grep '^nvidia[0-9]' | sort
        test -c /dev/nvidiactl && echo ctl-is-a-char-device
        env | grep '^NVIDIA_' | sort
        grep -c '{NOTE} libcuda.so.{VERSION}' {lib}
        /usr/bin/nvidia-smi
        test -S /run/nvidia-persistenced/socket && echo persistenced-socket
        ls /lib/firmware/nvidia/{VERSION}
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert lines[:2] == ["nvidia3", "ctl-is-a-char-device"]  # only the requested GPU's node
    assert f"NVIDIA_CTK_LIBCUDA_DIR={library_folder()}" in lines and "NVIDIA_VISIBLE_DEVICES=void" in lines
    assert "1" in lines  # the mounted library is the simulated driver's file
    assert f"nvidia-smi ({NOTE}, driver {VERSION})" in result.stdout
    assert "persistenced-socket" in lines and "gsp_ga10x.bin" in lines
    hooks = spec.hooks_run()
    assert [h.split()[1] for h in hooks] == ["create-symlinks", "create-symlinks", "enable-cuda-compat",
                                             "update-ldcache", "disable-device-node-modification",
                                             "update-application-profile"], hooks
    assert all(h.startswith("hook ") for h in hooks)
    assert f"--link libcuda.so.1::{library_folder()}/libcuda.so" in hooks[1]
    assert hooks[2] == f"hook enable-cuda-compat --host-driver-version={VERSION}"


def test_an_unknown_device_is_refused(podman: Podman, write_spec: Callable[..., Written]) -> None:
    spec = write_spec("h200")
    result = podman.run([spec.name("GPU-00000000-0000-0000-0000-000000000000")], "true")
    assert result.returncode != 0
    assert "unresolvable CDI devices" in result.stderr, result.stderr


def test_a_mig_device_gets_its_parent_and_capability_nodes(podman: Podman, write_spec: Callable[..., Written]) -> None:
    spec = write_spec("a100-mig-mixed", mig_strategy="mixed")
    gpu = spec.backend.node.gpus[3]
    mig = gpu.mig_devices[1]  # 2g.10gb on GPU 3
    device = next(d for d in spec.specs.specs[0].doc["devices"] if d["name"] == mig.uuid)
    caps = [n["path"] for n in device["containerEdits"]["deviceNodes"][1:]]
    result = podman.run([spec.name(mig.uuid)], "ls /dev | grep '^nvidia[0-9]'; ls /dev/nvidia-caps")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["nvidia3", *sorted(os.path.basename(c) for c in caps)]
    assert len(caps) == 2  # the GPU instance's and the compute instance's access nodes


def test_index_names_resolve(podman: Podman, write_spec: Callable[..., Written]) -> None:
    spec = write_spec("a100-mig-mixed", mig_strategy="mixed", device_id_strategy="index")
    assert "6" in spec.specs.specs[0].device_names and "0:1" in spec.specs.specs[0].device_names
    result = podman.run([spec.name("6"), spec.name("0:1")], "ls /dev | grep '^nvidia[0-9]' | sort; ls /dev/nvidia-caps")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["nvidia0", "nvidia6"]


def test_feature_specs_resolve(podman: Podman, write_spec: Callable[..., Written]) -> None:
    spec = write_spec("h200", gds_enabled="true", mofed_enabled="true", gdrcopy_enabled="true", imex_channel_ids="0")
    assert spec.specs.classes == {"gpu", "gds", "mofed", "gdrcopy", "imex-channel"}
    devices = [spec.name(spec.backend.node.gpus[0].uuid), spec.name("all", "gds"), spec.name("all", "mofed"),
               spec.name("all", "gdrcopy"), spec.name("0", "imex-channel")]
    result = podman.run(devices, "test -c /dev/nvidia-fs0 && test -c /dev/infiniband/uverbs0 && test -c /dev/gdrdrv "
                                 "&& test -c /dev/nvidia-caps-imex-channels/channel0 && echo features-ok")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "features-ok"


def _drm_node(spec: Written, gid: int) -> None:
    """Give GPU 0 of the simulated node a DRM card node that only its group may open."""
    root = Path(spec.backend.driver_roots(spec.backend.node).scan_driver)
    bus = "0000:" + spec.backend.node.gpus[0].pci_bus_id[9:].lower()
    (root / f"sys/bus/pci/devices/{bus}/drm/card1").mkdir(parents=True)
    card = root / "dev/dri/card1"
    card.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(card, 0o660 | 0o020000, os.stat("/dev/null").st_rdev)
    os.chown(card, 0, gid)
    card.chmod(0o660)


def test_drm_nodes_need_cdi_0_7_0_which_podman_4_3_refuses_unless_the_feature_flag_drops_the_gids(
        podman: Podman, write_spec: Callable[..., Written]) -> None:
    spec = write_spec("h200")
    _drm_node(spec, gid=44)
    spec.regenerate()
    gpu = spec.specs.specs[0].doc["devices"][0]
    assert spec.specs.specs[0].doc["cdiVersion"] == "0.7.0" and gpu["containerEdits"]["additionalGids"] == [44]
    refused = podman.run([spec.name(gpu["name"])], "true", debug=True)
    assert refused.returncode != 0 and "unresolvable CDI devices" in refused.stderr
    assert "0.7.0" in refused.stderr or "additionalGids" in refused.stderr, refused.stderr[-2000:]

    spec.cfg = load({**_cli(spec.cfg), "cdi_feature_flags": "no-additional-gids-for-device-nodes"}, {})
    spec.regenerate()
    assert spec.specs.specs[0].doc["cdiVersion"] == "0.5.0"
    accepted = podman.run([spec.name(gpu["name"])], "test -c /dev/dri/card1 && echo card")
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip() == "card"
    assert any(f"../card1::/dev/dri/by-path/pci-0000:{spec.backend.node.gpus[0].pci_bus_id[9:].lower()}-card" in h
               for h in spec.hooks_run()), "the by-path link names container paths, not the driver root's"


def _cli(cfg: Config) -> dict[str, Any]:
    return {"simulate": cfg.simulate, "device_list_strategy": ",".join(cfg.device_list_strategy),
            "nvidia_cdi_hook_path": cfg.nvidia_cdi_hook_path, "cdi_spec_dir": cfg.cdi_spec_dir}


MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "cdiVersion 0.7.0": lambda d: d.update(cdiVersion="0.7.0"),
    "unknown field": lambda d: d.update(bogusField=1),
    "env without '='": lambda d: d["containerEdits"]["env"].append("NOEQUALS"),
    "device name with '/'": lambda d: d["devices"][0].update(name="gpu/1!"),
    "device node without path": lambda d: d["devices"][0]["containerEdits"]["deviceNodes"][0].pop("path"),
    "missing host device node": lambda d: d["devices"][0]["containerEdits"]["deviceNodes"][0].update(
        hostPath="/dev/nvdp-does-not-exist"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_malformed_spec_is_refused(podman: Podman, write_spec: Callable[..., Written], mutation: str) -> None:
    """The good spec works and the same spec broken in one place does not: the test can fail."""
    spec = write_spec("h200")
    name = spec.name(spec.backend.node.gpus[0].uuid)
    assert podman.run([name], "true").returncode == 0
    doc = json.loads(spec.gpu_file.read_text())
    MUTATIONS[mutation](doc)
    spec.gpu_file.write_text(json.dumps(doc))
    result = podman.run([name], "echo started")
    assert result.returncode != 0 and "started" not in result.stdout, (mutation, result.stdout, result.stderr)


async def test_the_plugin_writes_the_spec_its_allocate_names_resolve_in(
        container_tools: None, rootfs: Path, kubelet: FakeKubelet, make_config: Callable[..., Config],
        tmp_path: Path) -> None:
    """The whole path: the plugin writes its spec (before registering), Allocate answers with CDI
    names, podman resolves those names in that spec. The vendor part of the kind and of the names is
    swapped for the test's own when the file is copied to /var/run/cdi; nothing else is touched."""
    cfg = make_config("dgx-h100", device_list_strategy="cdi-cri", cdi_spec_dir=str(tmp_path / "cdi"),
                      cdi_disable_hooks="all")
    vendor = f"nvdp-test-{uuid.uuid4().hex[:8]}.example.com"
    target = SPEC_DIR / f"{vendor}-gpu.json"
    async with running_plugin(cfg) as plugin:
        endpoint = await kubelet.wait_registered("nvidia.com/gpu")
        chosen = list(endpoint.devices)[2:4]
        response = await kubelet.allocate("nvidia.com/gpu", chosen)
        names = [d.name for d in response.cdi_devices]
        assert names == [f"{CDI_VENDOR}/gpu={d}" for d in chosen]
        text = (tmp_path / "cdi" / f"{CDI_VENDOR}-gpu.json").read_text()
        try:
            target.write_text(text.replace(f'"kind": "{CDI_VENDOR}/gpu"', f'"kind": "{vendor}/gpu"'))
            result = Podman(rootfs).run([n.replace(CDI_VENDOR, vendor) for n in names],
                                        "ls /dev | grep '^nvidia[0-9]' | sort")
        finally:
            target.unlink(missing_ok=True)
        assert result.returncode == 0, result.stderr
        minors = sorted(f"nvidia{g.minor}" for g in plugin.node.gpus if g.uuid in chosen) if plugin.node else []
        assert result.stdout.split() == minors
