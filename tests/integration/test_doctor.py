"""`nvdp doctor` against whole node layouts built in temporary folders, with a real fake kubelet.

Each row starts from a good node (driver files, /proc, /sys, /dev, containerd configured for
NVIDIA, a kubelet answering) and breaks one thing; the expected statuses are listed per check.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from nvdp.backends.simulated.backend import load_profile
from nvdp.backends.simulated.expand import build_node
from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.core.devices import MigInfo, Node
from nvdp.core.topology import bus_key
from nvdp.errors import NvmlUnavailable
from nvdp.testing import FakeKubelet
from nvdp.tools.doctor import CHECKS, Doctor, Layout, Result, Status, blocking, render, to_json

VERSION = "580.65.06"
ROOT = Path(__file__).parents[2]
P, W, F, S = Status.PASS, Status.WARN, Status.FAIL, Status.SKIP
CONTAINERD_NVIDIA = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "nvidia"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
  BinaryName = "/usr/bin/nvidia-container-runtime"
"""
CONTAINERD_RUNC = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
"""
CONTAINERD_NVIDIA_NOT_DEFAULT = CONTAINERD_RUNC + (
    '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]\n'
    '  BinaryName = "/usr/bin/nvidia-container-runtime"\n'
)


class StaticBackend:
    """A backend that reports a fixed node (the seam doctor takes)."""

    name = "nvml"

    def __init__(self, node: Node) -> None:
        self.node = node

    def discover(self) -> Node:
        return self.node

    def close(self) -> None:
        pass


def missing_nvml() -> StaticBackend:
    raise NvmlUnavailable("could not load or initialise NVML (libnvidia-ml.so.1: cannot open shared object file)",
                          ("/driver/usr/lib64/libnvidia-ml.so.1", "libnvidia-ml.so.1"))


BackendFor = Callable[[Node], Callable[[], StaticBackend]]  # how a row makes its backend from the node


def static(node: Node) -> Callable[[], StaticBackend]:
    return lambda: StaticBackend(node)


def no_nvml(node: Node) -> Callable[[], StaticBackend]:
    return missing_nvml


def with_mig(node: Node, devices: int = 1) -> Callable[[], StaticBackend]:
    """GPU 0 in MIG mode with `devices` 1g MIG devices; the others whole."""
    migs = tuple(MigInfo(slot=i, uuid=f"MIG-{i}", gi_id=i + 1, ci_id=0, gi_slices=1, ci_slices=1, memory_mb=11000)
                 for i in range(devices))
    first = replace(node.gpus[0], mig_enabled=True, mig_devices=migs)
    return static(replace(node, gpus=(first, *node.gpus[1:])))


def with_empty_mig(node: Node) -> Callable[[], StaticBackend]:
    return with_mig(node, devices=0)


def pcie_node() -> Node:
    label, profile = load_profile("pcie-l40s")
    return replace(build_node(label, profile), driver_version=VERSION)


def put(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def build_good_node(root: Path, node: Node) -> None:
    lib = root / "driver/usr/lib/x86_64-linux-gnu"
    put(lib / f"libnvidia-ml.so.{VERSION}")
    (lib / "libnvidia-ml.so.1").symlink_to(f"libnvidia-ml.so.{VERSION}")
    put(root / "proc/driver/nvidia/version",
        f"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {VERSION}  Release Build  (dvs-builder@U16)\n"
        "GCC version:  gcc version 12.3.0\n")
    for gpu in node.gpus:
        bus = bus_key(gpu.pci_bus_id)
        put(root / f"proc/driver/nvidia/gpus/{bus}/information", f"Model: {gpu.name}\n")
        put(root / f"sys/bus/pci/devices/{bus}/vendor", "0x10de\n")
        put(root / f"sys/bus/pci/devices/{bus}/class", "0x030200\n")
        put(root / f"dev/nvidia{gpu.minor}")
    put(root / "sys/bus/pci/devices/0000:05:00.0/vendor", "0x10de\n")  # an NVSwitch: a bridge, not a GPU
    put(root / "sys/bus/pci/devices/0000:05:00.0/class", "0x068000\n")
    for name in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"):
        put(root / "dev" / name)
    put(root / "etc/containerd/config.toml", CONTAINERD_NVIDIA)
    put(root / "proc/sys/fs/inotify/max_user_instances", "128\n")
    put(root / "proc/4242/comm", "containerd\n")
    (root / "proc/4242/fd").mkdir()
    os.symlink("anon_inode:inotify", root / "proc/4242/fd/7")
    (root / "run").mkdir()


def layout(root: Path, kubelet_socket: str) -> Layout:
    return Layout(driver_root=root / "driver", dev_root=root, proc=root / "proc", sys=root / "sys",
                  etc=root / "etc", run=root / "run", var=root / "var", kubelet_socket=kubelet_socket)


def statuses(results: list[Result]) -> dict[str, Status]:
    return {r.name: r.status for r in results}


GOOD = {"kernel-driver": P, "nvml-library": P, "nvml": P, "gpus": P, "device-nodes": P, "mig": P,
        "kubelet-folder": P, "kubelet-socket": P, "container-runtime": P, "cdi-specs": S, "inotify": P, "clock": P}
Mutate = Callable[[Path], None]


def nothing(root: Path) -> None:
    pass


def no_driver(root: Path) -> None:
    import shutil

    shutil.rmtree(root / "driver")
    shutil.rmtree(root / "proc/driver")
    for dev in (root / "dev").iterdir():
        dev.unlink()


def write(rel: str, text: str) -> Mutate:
    def mutate(root: Path) -> None:
        put(root / rel, text)

    return mutate


def remove(rel: str) -> Mutate:
    return lambda root: (root / rel).unlink()


def mismatched_library(root: Path) -> None:
    lib = root / "driver/usr/lib/x86_64-linux-gnu"
    (lib / "libnvidia-ml.so.1").unlink()
    put(lib / "libnvidia-ml.so.590.10")
    (lib / "libnvidia-ml.so.1").symlink_to("libnvidia-ml.so.590.10")


def k3s(root: Path) -> None:
    """A k3s node: k3s generated containerd's config with the nvidia runtime, not as the default."""
    (root / "etc/containerd/config.toml").unlink()
    put(root / "var/lib/rancher/k3s/agent/etc/containerd/config.toml", CONTAINERD_NVIDIA_NOT_DEFAULT)
    put(root / "proc/4242/comm", "containerd\n")
    put(root / "proc/4000/comm", "k3s-agent\n")


def hidden_gpu(root: Path) -> None:
    put(root / "sys/bus/pci/devices/0000:e1:00.0/vendor", "0x10de\n")
    put(root / "sys/bus/pci/devices/0000:e1:00.0/class", "0x030200\n")


def cdi_spec(root: Path) -> None:
    names = "\n".join(f"  - name: {g.uuid}" for g in pcie_node().gpus)
    put(root / "run/cdi/k8s.device-plugin.nvidia.com-gpu.yaml",
        f"cdiVersion: 0.5.0\nkind: k8s.device-plugin.nvidia.com/gpu\ndevices:\n{names}\n")


@pytest.mark.parametrize(
    ("mutate", "cfg", "backend", "changed"),
    [
        pytest.param(nothing, {}, static, {}, id="good node"),
        pytest.param(no_driver, {}, no_nvml, {"kernel-driver": F, "nvml-library": F, "nvml": F, "gpus": S,
                                                   "device-nodes": F, "mig": S}, id="missing driver"),
        pytest.param(write("etc/containerd/config.toml", CONTAINERD_RUNC), {}, static, {"container-runtime": F},
                     id="runtime not configured"),
        pytest.param(write("etc/containerd/config.toml", CONTAINERD_NVIDIA_NOT_DEFAULT), {}, static,
                     {"container-runtime": W}, id="nvidia runtime not the default"),
        pytest.param(write("etc/containerd/config.toml", "version = 2\n[plugins\n"), {}, static,
                     {"container-runtime": F}, id="runtime config unparsable"),
        pytest.param(write("proc/4242/comm", "crio\n"), {}, static, {"container-runtime": W},
                     id="CRI-O running without a CRI-O config"),
        pytest.param(k3s, {}, static, {"container-runtime": W}, id="k3s: nvidia runtime not the default"),
        pytest.param(nothing, {"device_list_strategy": "cdi-cri"}, static, {"cdi-specs": F, "container-runtime": P},
                     id="CDI strategy without a spec"),
        pytest.param(cdi_spec, {"device_list_strategy": "cdi-cri", "cdi_spec_dir": ""}, static, {"cdi-specs": P},
                     id="CDI spec present, nvdp writes none"),
        pytest.param(cdi_spec, {"device_list_strategy": "cdi-cri"}, static, {"cdi-specs": W},
                     id="CDI spec from elsewhere, nvdp's own missing"),
        pytest.param(write("proc/driver/nvidia/version", "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.1.2\n"),
                     {}, static, {"kernel-driver": F}, id="kernel module and NVML disagree"),
        pytest.param(mismatched_library, {}, no_nvml, {"kernel-driver": F, "nvml": F, "gpus": S, "mig": S},
                     id="library file newer than the module"),
        pytest.param(hidden_gpu, {}, static, {"gpus": W}, id="GPU on the bus hidden from NVML"),
        pytest.param(remove("dev/nvidia1"), {}, static, {"device-nodes": F}, id="device node missing"),
        pytest.param(remove("dev/nvidia-uvm"), {}, static, {"device-nodes": W}, id="nvidia-uvm not created yet"),
        pytest.param(nothing, {}, with_mig, {"mig": W, "device-nodes": W}, id="MIG on with strategy none, no caps"),
        pytest.param(nothing, {"mig_strategy": "mixed"}, with_mig, {"device-nodes": W}, id="MIG served by mixed"),
        pytest.param(nothing, {"mig_strategy": "single"}, with_mig, {"mig": F, "device-nodes": W},
                     id="single with MIG on one GPU only"),
        pytest.param(nothing, {"mig_strategy": "mixed"}, with_empty_mig, {"mig": W, "device-nodes": W},
                     id="MIG on without MIG devices"),
        pytest.param(write("proc/sys/fs/inotify/max_user_instances", "1\n"), {}, static, {"inotify": F},
                     id="inotify instances exhausted"),
        pytest.param(nothing, {"kubelet_socket": "<root>/kubelet/kubelet.sock"}, static,
                     {"kubelet-folder": F, "kubelet-socket": F}, id="kubelet folder not mounted"),
        pytest.param(write("kubelet/kubelet.sock", ""), {"kubelet_socket": "<root>/kubelet/kubelet.sock"}, static,
                     {"kubelet-socket": F}, id="kubelet.sock not a socket"),
        pytest.param(nothing, {"kubelet_socket": ""}, static, {"kubelet-folder": S, "kubelet-socket": S},
                     id="registration off"),
    ],
)
async def test_node_layouts(
    tmp_path: Path,
    kubelet: FakeKubelet,
    mutate: Mutate,
    cfg: dict[str, str],
    backend: BackendFor,
    changed: dict[str, Status],
) -> None:
    node = pcie_node()
    build_good_node(tmp_path, node)
    mutate(tmp_path)
    values = {"kubelet_socket": kubelet.socket_path, **cfg}
    values["kubelet_socket"] = values["kubelet_socket"].replace("<root>", str(tmp_path))
    config: Config = load(values, {})
    doctor = Doctor(config, layout(tmp_path, config.kubelet_socket), backend(node), now=lambda: 1.8e9)
    results = await doctor.run()
    assert statuses(results) == GOOD | changed, "\n".join(render(results))
    assert blocking(results) == (F in changed.values())
    for r in results:
        if r.status in (F, W):
            assert r.fix, f"{r.name} says what is wrong but not what to do"


async def test_missing_driver_names_the_paths_tried(tmp_path: Path, kubelet: FakeKubelet) -> None:
    build_good_node(tmp_path, pcie_node())
    no_driver(tmp_path)
    doctor = Doctor(load({"kubelet_socket": kubelet.socket_path}, {}), layout(tmp_path, kubelet.socket_path),
                    missing_nvml)
    results = {r.name: r for r in await doctor.run()}
    assert f"tried {tmp_path}/driver/usr/lib64/libnvidia-ml.so.1" in results["nvml-library"].details
    assert "searched libnvidia-ml.so.1" in results["nvml"].details
    assert "runtimeClassName: nvidia" in results["nvml"].fix


async def test_runtime_not_configured_says_how_to_configure_it(tmp_path: Path, kubelet: FakeKubelet) -> None:
    node = pcie_node()
    build_good_node(tmp_path, node)
    put(tmp_path / "etc/containerd/config.toml", CONTAINERD_RUNC)
    doctor = Doctor(load({"kubelet_socket": kubelet.socket_path}, {}), layout(tmp_path, kubelet.socket_path),
                    lambda: StaticBackend(node))
    result = {r.name: r for r in await doctor.run()}["container-runtime"]
    assert "containerd: not configured for NVIDIA" in result.summary
    assert result.fix.startswith("nvidia-ctk runtime configure --runtime=containerd --set-as-default")
    assert f"read {tmp_path}/etc/containerd/config.toml" in result.details


async def test_k3s_is_judged_by_its_own_config(tmp_path: Path, kubelet: FakeKubelet) -> None:
    node = pcie_node()
    build_good_node(tmp_path, node)
    k3s(tmp_path)
    put(tmp_path / "etc/containerd/config.toml", CONTAINERD_NVIDIA)  # a leftover that k3s does not read
    doctor = Doctor(load({"kubelet_socket": kubelet.socket_path}, {}), layout(tmp_path, kubelet.socket_path),
                    lambda: StaticBackend(node))
    result = {r.name: r for r in await doctor.run()}["container-runtime"]
    assert result.status is W and result.summary.startswith("containerd (k3s): the nvidia runtime")
    assert "--default-runtime=nvidia" in result.fix


async def test_mig_uses_the_plugins_own_rules(tmp_path: Path, kubelet: FakeKubelet) -> None:
    node = pcie_node()
    build_good_node(tmp_path, node)
    cfg = load({"kubelet_socket": kubelet.socket_path, "mig_strategy": "single"}, {})
    doctor = Doctor(cfg, layout(tmp_path, kubelet.socket_path), with_mig(node))
    result = {r.name: r for r in await doctor.run()}["mig"]
    assert result.status is F
    assert "the plugin would not start: all devices on the node must be configured with the same migEnabled" in (
        result.summary)
    assert result.details[0] == "layout: 0:1g.11gb 1:off 2:off 3:off"


async def test_clock_before_2025_warns(tmp_path: Path, kubelet: FakeKubelet) -> None:
    node = pcie_node()
    build_good_node(tmp_path, node)
    doctor = Doctor(load({"kubelet_socket": kubelet.socket_path}, {}), layout(tmp_path, kubelet.socket_path),
                    lambda: StaticBackend(node), now=lambda: datetime(1970, 1, 2, tzinfo=UTC).timestamp())
    result = {r.name: r for r in await doctor.run()}["clock"]
    assert result.status is W and "1970-01-02" in result.summary


async def test_cli_json_on_the_simulated_node(tmp_path: Path, kubelet: FakeKubelet) -> None:
    build_good_node(tmp_path, pcie_node())
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "nvdp"), "doctor", "--json", "--simulate", "pcie-l40s",
        "--kubelet-socket", kubelet.socket_path, "--proc-root", str(tmp_path / "proc"),
        "--sys-root", str(tmp_path / "sys"), "--etc-root", str(tmp_path / "etc"), "--run-root", str(tmp_path / "run"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("NVDP_")},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    report = json.loads(out)
    assert proc.returncode == 0, err
    assert report["ok"] is True
    got = {c["name"]: c["status"] for c in report["checks"]}
    assert got["kernel-driver"] == got["nvml-library"] == got["device-nodes"] == "skip"
    assert got["nvml"] == got["gpus"] == got["kubelet-socket"] == got["container-runtime"] == "pass"


async def test_cli_exits_1_when_something_blocks(tmp_path: Path) -> None:
    build_good_node(tmp_path, pcie_node())
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "nvdp"), "doctor", "--simulate", "pcie-l40s",
        "--kubelet-socket", str(tmp_path / "nowhere/kubelet.sock"), "--etc-root", str(tmp_path / "etc"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, err
    text = out.decode()
    assert "FAIL  kubelet-folder" in text and "something blocks the plugin" in text
    assert b"Traceback" not in err


def test_json_shape() -> None:
    results = [Result(P, "ok", name="nvml"), Result(F, "none", ("a",), "fix it", name="gpus")]
    assert to_json(results) == {"ok": False, "checks": [
        {"name": "nvml", "status": "pass", "summary": "ok", "details": [], "fix": ""},
        {"name": "gpus", "status": "fail", "summary": "none", "details": ["a"], "fix": "fix it"}]}


def test_operations_doc_lists_every_check() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    missing = [name for name, _ in CHECKS if f"`{name}`" not in doc]
    assert not missing, f"docs/operations.md does not describe {missing}"


# --- counts match the lines (issue 12) --------------------------------------------------------------


def _number(summary: str, noun: str) -> int:
    match = re.search(rf"(\d+) {noun}", summary)
    assert match, f"no count of {noun!r} in {summary!r}"
    return int(match.group(1))


async def test_device_node_counts_match_the_lines(tmp_path: Path, kubelet: FakeKubelet) -> None:
    node = pcie_node()
    build_good_node(tmp_path, node)
    for name in ("nvidia1", "nvidia-uvm", "nvidia-uvm-tools"):
        (tmp_path / "dev" / name).unlink()
    doctor = Doctor(load({"kubelet_socket": kubelet.socket_path}, {}), layout(tmp_path, kubelet.socket_path),
                    static(node))
    result = {r.name: r for r in await doctor.run()}["device-nodes"]
    assert result.status is F
    required = [d for d in result.details if d.startswith("missing") and "uvm" not in d]
    optional = [d for d in result.details if d.startswith("missing") and "uvm" in d]
    assert (len(required), len(optional)) == (1, 2), result.details
    assert _number(result.summary, "required device node ") == 1, result.summary
    assert _number(result.summary, "optional") == 2, result.summary
    assert "(s)" not in result.summary


@pytest.mark.parametrize(
    ("statuses_", "summary"),
    [
        pytest.param([P, W], "1 passed, 1 warning, 0 failed, 0 skipped", id="one warning"),
        pytest.param([W, W, F], "0 passed, 2 warnings, 1 failed, 0 skipped", id="two warnings"),
    ],
)
def test_the_summary_line_uses_plural_forms_right(statuses_: list[Status], summary: str) -> None:
    results = [Result(s, "x", fix="do y", name=f"check-{i}") for i, s in enumerate(statuses_)]
    assert list(render(results))[-1].startswith(summary + ":")


async def test_no_summary_says_n_things_in_brackets(tmp_path: Path, kubelet: FakeKubelet) -> None:
    node = pcie_node()
    build_good_node(tmp_path, node)
    hidden_gpu(tmp_path)
    doctor = Doctor(load({"kubelet_socket": kubelet.socket_path}, {}), layout(tmp_path, kubelet.socket_path),
                    with_mig(node))
    summaries = [r.summary for r in await doctor.run()]
    assert not [s for s in summaries if "(s)" in s], summaries
    assert any("1 NVIDIA GPU on the PCI bus is not visible" in s for s in summaries), summaries
