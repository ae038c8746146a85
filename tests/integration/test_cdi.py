"""The CDI spec files of a running plugin (real gRPC, the fake kubelet, a simulated node): written
before registration, rewritten on a reload or a MIG layout change only when they change, and what
happens when they cannot be written; `nvdp doctor`'s check against them; `nvdp cdi` as operators
run it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.options import Config
from nvdp.core.container import CDI_VENDOR
from nvdp.core.devices import Node
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.testing import FakeKubelet
from nvdp.tools.doctor import Doctor, Layout, Status
from tests.conftest import running_plugin

GPU = "nvidia.com/gpu"
GPU_FILE = f"{CDI_VENDOR}-gpu.json"
BIN = Path(sys.executable).parent
MakeConfig = Callable[..., Config]


def spec_of(folder: Path, cls: str = "gpu") -> dict[str, Any]:
    return dict(json.loads((folder / f"{CDI_VENDOR}-{cls}.json").read_text()))


def names_in(folder: Path) -> list[str]:
    return [d["name"] for d in spec_of(folder)["devices"]]


class SpecCheckingKubelet(FakeKubelet):
    """Notes, at each Register, whether the plugin's spec file is already there."""

    def __init__(self, folder: str, spec: Path) -> None:
        super().__init__(folder)
        self.spec = spec
        self.spec_at_register: list[bool] = []

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.Empty:
        self.spec_at_register.append(self.spec.exists())
        return await super().Register(request, context)


async def test_the_spec_is_written_before_registering_and_defines_what_allocate_names(
        plugin_dir: Path, make_config: MakeConfig, tmp_path: Path) -> None:
    spec_dir = tmp_path / "cdi"
    cfg = make_config("dgx-h100", device_list_strategy="cdi-cri,cdi-annotations", cdi_spec_dir=str(spec_dir))
    kubelet = SpecCheckingKubelet(str(plugin_dir), spec_dir / GPU_FILE)
    async with kubelet, running_plugin(cfg):
        endpoint = await kubelet.wait_registered(GPU)
        assert kubelet.spec_at_register == [True]
        chosen = list(endpoint.devices)[:2]
        response = await kubelet.allocate(GPU, chosen)
    names = [d.name for d in response.cdi_devices]
    assert names == [f"{CDI_VENDOR}/gpu={d}" for d in chosen]
    assert list(response.annotations.values()) == [",".join(names)]
    assert set(chosen) <= set(names_in(spec_dir))
    assert stat_mode(spec_dir / GPU_FILE) == 0o644
    assert sorted(p.name for p in spec_dir.iterdir()) == [GPU_FILE]  # no feature on: no feature spec


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_reload_and_mig_changes_rewrite_the_spec_only_when_it_changes(
        kubelet: FakeKubelet, make_config: MakeConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec_dir = tmp_path / "cdi"
    backend = SimulatedBackend("a100-mig-mixed")
    settings = {"mig_strategy": "mixed", "device_list_strategy": "cdi-cri", "cdi_spec_dir": str(spec_dir)}
    current = {"cfg": make_config("a100-mig-mixed", **settings)}
    caplog.set_level(logging.INFO, logger="nvdp.cdi")
    async with running_plugin(current["cfg"], backend_factory=lambda cfg: backend,
                              reload_config=lambda: current["cfg"]) as plugin:
        await kubelet.wait_registered("nvidia.com/mig-1g.5gb")
        path = spec_dir / GPU_FILE
        inode = path.stat().st_ino
        before = names_in(spec_dir)

        await plugin.reload()  # same config, same node: the file is left alone
        assert path.stat().st_ino == inode

        backend.set_mig_layout(7, ["7g.40gb"])  # GPU 7 gets a MIG device
        assert await plugin.rescan() is True
        await kubelet.wait_registered("nvidia.com/mig-7g.40gb")
        new_mig = backend.node.gpus[7].mig_devices[0].uuid
        assert path.stat().st_ino != inode and set(names_in(spec_dir)) == {*before, new_mig}
        response = await kubelet.allocate("nvidia.com/mig-7g.40gb", [new_mig])
        assert [d.name for d in response.cdi_devices] == [f"{CDI_VENDOR}/gpu={new_mig}"]

        current["cfg"] = make_config("a100-mig-mixed", **settings, device_id_strategy="index")
        await plugin.reload()
        assert "7:0" in names_in(spec_dir) and new_mig not in names_in(spec_dir)
        response = await kubelet.allocate("nvidia.com/mig-7g.40gb", [new_mig])
        assert [d.name for d in response.cdi_devices] == [f"{CDI_VENDOR}/gpu=7:0"]
    written = [r for r in caplog.records if r.getMessage() == "CDI spec written"]
    assert len(written) == 3  # start, the MIG change, the index reload; not the unchanged reload


async def test_feature_specs_are_written_and_named_and_removed_when_turned_off(
        kubelet: FakeKubelet, make_config: MakeConfig, tmp_path: Path) -> None:
    spec_dir = tmp_path / "cdi"
    settings = {"device_list_strategy": "cdi-cri", "cdi_spec_dir": str(spec_dir)}
    current = {"cfg": make_config("h200", **settings, gds_enabled="true", imex_channel_ids="0")}
    async with running_plugin(current["cfg"], reload_config=lambda: current["cfg"]) as plugin:
        endpoint = await kubelet.wait_registered(GPU)
        assert sorted(p.name for p in spec_dir.iterdir()) == [
            f"{CDI_VENDOR}-gds.json", GPU_FILE, f"{CDI_VENDOR}-imex-channel.json"]
        assert [d["name"] for d in spec_of(spec_dir, "gds")["devices"]] == ["all"]
        response = await kubelet.allocate(GPU, list(endpoint.devices))
        assert [d.name for d in response.cdi_devices][1:] == [f"{CDI_VENDOR}/imex-channel=0", f"{CDI_VENDOR}/gds=all"]
        assert response.envs == {"NVIDIA_GDS": "enabled"}
        current["cfg"] = make_config("h200", **settings)
        await plugin.reload()
        assert sorted(p.name for p in spec_dir.iterdir()) == [GPU_FILE]


async def test_a_spec_folder_that_cannot_be_written_is_logged_and_the_plugin_serves(
        kubelet: FakeKubelet, make_config: MakeConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("not a folder")
    spec_dir = tmp_path / "file/cdi"
    cfg = make_config("h200", device_list_strategy="cdi-cri", cdi_spec_dir=str(spec_dir))
    async with running_plugin(cfg) as plugin:
        endpoint = await kubelet.wait_registered(GPU)
        response = await kubelet.allocate(GPU, list(endpoint.devices))
        assert [d.name for d in response.cdi_devices] == [f"{CDI_VENDOR}/gpu={d}" for d in endpoint.devices]
        assert plugin.cdi.last_error is not None and str(tmp_path / "file/cdi") in plugin.cdi.last_error
    errors = [r for r in caplog.records if r.getMessage() == "CDI spec not written"]
    assert len(errors) == 1 and str(spec_dir) in str(getattr(errors[0], "error", ""))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"CDI spec {spec_dir / GPU_FILE} is not written by nvdp (it could not be written)" in w
               for w in warnings)


async def test_writing_off_warns_at_start_and_on_every_change(
        kubelet: FakeKubelet, make_config: MakeConfig, caplog: pytest.LogCaptureFixture) -> None:
    backend = SimulatedBackend("a100-mig-mixed")
    cfg = make_config("a100-mig-mixed", mig_strategy="mixed", device_list_strategy="cdi-annotations", cdi_spec_dir="")
    async with running_plugin(cfg, backend_factory=lambda c: backend, reload_config=lambda: cfg) as plugin:
        await kubelet.wait_registered(GPU)
        backend.set_mig_layout(7, ["7g.40gb"])
        assert await plugin.rescan() is True
        await plugin.reload()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "nvdp.cdi"]
    assert len(warnings) == 3, warnings  # start, the MIG change, the reload
    assert all(w.startswith(f"CDI spec /var/run/cdi/{GPU_FILE} is not written by nvdp (--cdi-spec-dir is empty")
               for w in warnings)


async def test_no_cdi_strategy_no_spec_and_no_warning(
        kubelet: FakeKubelet, make_config: MakeConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running_plugin(make_config("h200", cdi_spec_dir=str(tmp_path / "cdi"))):
        await kubelet.wait_registered(GPU)
    assert not (tmp_path / "cdi").exists()
    assert not [r for r in caplog.records if r.name == "nvdp.cdi"]


# --- nvdp doctor -------------------------------------------------------------------------------


class Opened:
    """The simulated backend doctor discovers with (kept open: its driver root is the spec's)."""

    def __init__(self, backend: SimulatedBackend) -> None:
        self.backend = backend

    def __call__(self) -> SimulatedBackend:
        return self.backend


async def doctor_cdi(cfg: Config, run_root: Path, tmp_path: Path, backend: SimulatedBackend) -> tuple[Status, str]:
    layout = Layout(proc=tmp_path / "proc", sys=tmp_path / "sys", etc=tmp_path / "etc", run=run_root,
                    var=tmp_path / "var", kubelet_socket="")
    results = await Doctor(cfg, layout, Opened(backend), simulated=True).run()
    found = next(r for r in results if r.name == "cdi-specs")
    return found.status, found.summary


async def test_doctor_passes_on_the_plugins_spec_and_fails_without_it(
        kubelet: FakeKubelet, make_config: MakeConfig, tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    spec_dir = run_root / "cdi"
    cfg = make_config("dgx-h100", device_list_strategy="cdi-cri", cdi_spec_dir=str(spec_dir))
    backend = SimulatedBackend("dgx-h100")
    async with running_plugin(cfg, backend_factory=lambda c: backend):
        await kubelet.wait_registered(GPU)
        status, summary = await doctor_cdi(cfg, run_root, tmp_path, backend)
        assert (status, summary) == (Status.PASS, f"{spec_dir / GPU_FILE} defines all 8 name(s) the plugin hands out "
                                                  "(cdiVersion 0.5.0)")

        doc = spec_of(spec_dir)
        doc["devices"] = doc["devices"][1:]
        (spec_dir / GPU_FILE).write_text(json.dumps(doc))
        status, summary = await doctor_cdi(cfg, run_root, tmp_path, backend)
        assert status is Status.FAIL and summary.startswith("1 device name(s) the plugin hands out are in no")

        (spec_dir / GPU_FILE).write_text("{not json")
        status, summary = await doctor_cdi(cfg, run_root, tmp_path, backend)
        assert status is Status.FAIL
        assert summary.startswith(f"unreadable CDI spec: {spec_dir / GPU_FILE}: not valid JSON")

        (spec_dir / GPU_FILE).unlink()
        status, summary = await doctor_cdi(cfg, run_root, tmp_path, backend)
        assert status is Status.FAIL and summary.startswith(f"nvdp's CDI spec {spec_dir / GPU_FILE} does not exist")
    backend.close()


async def test_doctor_fails_when_the_spec_folder_is_not_writable(
        kubelet: FakeKubelet, make_config: MakeConfig, tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    run_root.mkdir()
    (run_root / "cdi").write_text("a file where the folder should be")
    cfg = make_config("h200", device_list_strategy="cdi-cri", cdi_spec_dir=str(run_root / "cdi"))
    backend = SimulatedBackend("h200")
    async with running_plugin(cfg, backend_factory=lambda c: backend):
        await kubelet.wait_registered(GPU)
        status, summary = await doctor_cdi(cfg, run_root, tmp_path, backend)
    assert status is Status.FAIL and "does not exist" in summary and "the runtime cannot resolve" in summary
    backend.close()


async def test_doctor_warns_about_a_spec_only_podman_5_reads(
        kubelet: FakeKubelet, make_config: MakeConfig, tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    cfg = make_config("h200", device_list_strategy="cdi-cri", cdi_spec_dir=str(run_root / "cdi"))
    backend = SimulatedBackend("h200")
    async with running_plugin(cfg, backend_factory=lambda c: backend):
        await kubelet.wait_registered(GPU)
        doc = spec_of(run_root / "cdi")
        doc["cdiVersion"] = "0.7.0"
        (run_root / "cdi" / GPU_FILE).write_text(json.dumps(doc))
        status, summary = await doctor_cdi(cfg, run_root, tmp_path, backend)
        assert (status, summary) == (Status.WARN, "cdiVersion 0.7.0: podman 4.3 and containerd 1.7-era runtimes "
                                                  "refuse it")
        (tmp_path / "etc/cdi").mkdir(parents=True)
        (tmp_path / "etc/cdi/nvidia.json").write_text(json.dumps(doc))  # e.g. nvidia-ctk's, same kind
        status, summary = await doctor_cdi(cfg, run_root, tmp_path, backend)
        assert status is Status.FAIL and "defined in more than one spec file" in summary
    backend.close()


# --- nvdp cdi, as a command ----------------------------------------------------------------------


def nvdp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NVDP_", "CDI_", "DEVICE_"))}
    return subprocess.run([str(BIN / "nvdp"), *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})}, check=False)


def test_cdi_generate_writes_or_prints_the_same_spec(tmp_path: Path) -> None:
    root = tmp_path / "sim-root"
    out = tmp_path / "spec.json"
    done = nvdp("cdi", "generate", "--simulate", "a100-mig-mixed", "--driver-root", str(root), "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"wrote {out}: 38 device(s), cdiVersion 0.5.0"
    assert stat_mode(out) == 0o644
    printed = nvdp("cdi", "generate", "--simulate", "a100-mig-mixed", "--driver-root", str(root))
    assert printed.returncode == 0 and printed.stdout == out.read_text()  # the same root: the same spec
    doc = json.loads(out.read_text())
    assert doc["kind"] == f"{CDI_VENDOR}/gpu"
    assert doc["containerEdits"]["deviceNodes"][0] == {"path": "/dev/nvidiactl", "hostPath": f"{root}/dev/nvidiactl"}
    yaml_text = nvdp("cdi", "generate", "--simulate", "h200", "--format", "yaml", "--device-id-strategy", "index")
    assert yaml_text.returncode == 0
    assert "cdiVersion: 0.5.0\nkind: k8s.device-plugin.nvidia.com/gpu\ndevices:\n- name: '0'\n" in yaml_text.stdout
    assert "temporary folder, removed on exit" in yaml_text.stderr


def test_cdi_list_names_every_device_and_feature(tmp_path: Path) -> None:
    done = nvdp("cdi", "list", "--simulate", "h200-mig", "--mig-strategy", "mixed", "--gdrcopy-enabled",
                "--device-id-strategy", "index")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{CDI_VENDOR}/gpu=0", f"{CDI_VENDOR}/gpu=0:0", f"{CDI_VENDOR}/gpu=0:1", f"{CDI_VENDOR}/gpu=0:2",
        f"{CDI_VENDOR}/gpu=0:3", f"{CDI_VENDOR}/gdrcopy=all"]


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        pytest.param(["--cdi-feature-flags", "no-such-flag"], {}, 2, "invalid --cdi-feature-flags: invalid value: "
                     "'no-such-flag' (allowed: no-additional-gids-for-device-nodes", id="unknown feature flag"),
        pytest.param([], {"CDI_FEATURE_FLAGS": "nope"}, 2, "invalid CDI_FEATURE_FLAGS", id="from the env"),
        pytest.param(["--class", "gds"], {}, 1, "no gds spec for this node", id="feature off"),
        pytest.param(["--driver-root", "/etc"], {}, 1, "/etc is not empty and not a simulated driver root",
                     id="simulated root into a real folder"),
    ],
)
def test_cdi_generate_bad_input(args: list[str], env: dict[str, str], code: int, message: str) -> None:
    done = nvdp("cdi", "generate", "--simulate", "h200", *args, env=env)
    assert done.returncode == code, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


class NodeBackend:
    """A real node's backend as far as CDI is concerned: a node and no driver root of its own."""

    name = "nvml"

    def __init__(self, profile: str) -> None:
        self.node = SimulatedBackend(profile).node

    def discover(self) -> Node:
        return self.node

    def close(self) -> None:
        pass


def empty_root(root: Path) -> None:
    (root / "usr/lib64").mkdir(parents=True)


def garbage_ld_cache(root: Path) -> None:
    (root / "usr/lib64").mkdir(parents=True)
    (root / "usr/lib64" / "libcuda.so.580.159.04").write_text("")
    (root / "etc").mkdir()
    (root / "etc/ld.so.cache").write_bytes(b"\x00garbage")


@pytest.mark.parametrize(
    ("make_root", "error"),
    [
        pytest.param(empty_root, "no NVIDIA driver libraries (lib*.so.580.159.04) under the driver root {root}",
                     id="driver root without libraries"),
        pytest.param(garbage_ld_cache, "cannot parse the ld cache {root}/etc/ld.so.cache: unknown format",
                     id="unreadable ld cache"),
    ],
)
async def test_a_driver_root_the_spec_cannot_come_from_is_logged_and_the_plugin_serves(
        kubelet: FakeKubelet, make_config: MakeConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        make_root: Callable[[Path], None], error: str) -> None:
    root = tmp_path / "driver"
    make_root(root)
    cfg = make_config("h200", device_list_strategy="cdi-cri", cdi_spec_dir=str(tmp_path / "cdi"),
                      driver_root=str(root), container_driver_root=str(tmp_path / "not-mounted"))
    async with running_plugin(cfg, backend_factory=lambda c: NodeBackend("h200")):
        endpoint = await kubelet.wait_registered(GPU)
        response = await kubelet.allocate(GPU, list(endpoint.devices))
        assert len(response.cdi_devices) == 1
    logged = [str(getattr(r, "error", "")) for r in caplog.records if r.getMessage() == "CDI spec not written"]
    assert logged and logged[0].startswith(error.format(root=root)), logged
    assert not (tmp_path / "cdi").exists()


def test_the_plugin_refuses_an_unknown_feature_flag_before_any_socket(plugin_dir: Path) -> None:
    done = subprocess.run([str(BIN / "nvidia-device-plugin"), "--simulate", "h200", "--device-list-strategy", "cdi-cri",
                           "--cdi-feature-flags", "enable-everything", "--kubelet-socket", str(plugin_dir / "k.sock"),
                           "--cdi-spec-dir", str(plugin_dir / "cdi")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "invalid --cdi-feature-flags: invalid value: 'enable-everything'" in done.stderr
    assert list(plugin_dir.iterdir()) == []


def test_demo_shows_the_cdi_names_and_the_spec() -> None:
    done = nvdp("demo", "--profile", "h200", "--device-list-strategy", "cdi-cri")
    assert done.returncode == 0, done.stderr
    uuid = "GPU-561c5ac8-2525-530f-236a-f8e1e82e0c3b"
    assert f"kubelet: Allocate -> CDI devices {CDI_VENDOR}/gpu={uuid}" in done.stdout
    assert f"{GPU_FILE} (cdiVersion 0.5.0, kind {CDI_VENDOR}/gpu) defines 1 devices:" in done.stdout
    assert f"    {uuid}: /dev/nvidia0" in done.stdout
    assert "cdi: every gpu name of the answer is in the spec" in done.stdout
