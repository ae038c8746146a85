"""The built container image, run for real (`make test-image`): podman (or docker) runs the image with
the security options of our static manifest and chart against the fake kubelet, which serves on the
host side of the folder mounted at /var/lib/kubelet/device-plugins.

`make test-image` builds the image first (scripts/build-image) and names it in $NVDP_IMAGE.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from nvdp import __version__
from nvdp.testing import FakeKubelet

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
GPU = "nvidia.com/gpu"
DEVICE_PLUGINS = "/var/lib/kubelet/device-plugins"
WAIT_S = 60.0  # start-up of a fresh container on a busy 2-core machine; reached only when broken

# The official image's binaries, all four (install.sh lists them; nvdp.cli.IMAGE_PROGRAMS runs them).
PRESENT = ("nvidia-device-plugin", "gpu-feature-discovery", "mps-control-daemon", "config-manager")
NOT_YET: tuple[str, ...] = ()


def load_build_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("build_image", str(ROOT / "scripts" / "build-image"))
    spec = importlib.util.spec_from_loader("build_image", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


BUILD = load_build_script()


@pytest.fixture(scope="module")
def image() -> str:
    ref = os.environ.get("NVDP_IMAGE")
    if not ref:
        pytest.fail("NVDP_IMAGE is not set: run `make test-image`, which builds the image and names it")
    return ref


@pytest.fixture(scope="module")
def engine() -> str:
    return str(BUILD.find_engine(install=False))


def security_options(engine: str) -> list[str]:
    """What deployments/static/nvidia-device-plugin.yml and the chart's default securityContext ask
    for: readOnlyRootFilesystem (and, as Kubernetes does, no tmpfs added on top), capabilities
    drop ALL, allowPrivilegeEscalation false; and no network at all (the plugin needs none)."""
    options = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--network", "none"]
    return [*options, "--read-only-tmpfs=false"] if engine == "podman" else options


def run_args(engine: str) -> list[str]:
    return [engine, "run", *BUILD.engine_args(engine), *security_options(engine)]


def run_once(engine: str, image: str, entrypoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*run_args(engine), "--rm", "--entrypoint", entrypoint, image, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


async def engine_call(engine: str, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Without blocking the event loop: the fake kubelet serves in this loop meanwhile."""
    proc = await asyncio.create_subprocess_exec(engine, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode()


# --- what the image is ---------------------------------------------------------------------------

def test_image_config(engine: str, image: str) -> None:
    out = subprocess.run([engine, "image", "inspect", image], capture_output=True, text=True, check=True).stdout
    info = json.loads(out)[0]
    config = info["Config"]
    assert config["Entrypoint"] == ["nvidia-device-plugin"]
    assert config.get("User") in ("0:0", "0")
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert env["NVIDIA_DISABLE_REQUIRE"] == "true"
    assert env["PATH"].startswith("/opt/nvdp/bin:")
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.title"] == "nvdp"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    # base + the venv + the /usr/bin links; docs/deployment.md gives the measured size and count.
    assert len(info["RootFS"]["Layers"]) <= 4


CONTENTS_PROBE = r"""
import importlib.util, json, os, shutil, sys
names = json.loads(sys.argv[1])
compilers = ["gcc", "cc", "c++", "g++", "clang", "tcc", "cpp", "as", "ld", "x86_64-linux-gnu-gcc", "go", "rustc"]
test_dirs, pip_caches, host_pip = [], [], []
for top in ("/opt", "/usr", "/root", "/var", "/etc", "/home"):
    for folder, dirs, files in os.walk(top):
        base = os.path.basename(folder)
        if base in ("test", "tests") and any(f.endswith(".py") for f in files):
            test_dirs.append(folder)
        if folder.endswith(("/.cache/pip", "/pip/http", "/pip/wheels")):
            pip_caches.append(folder)
        if "conftest.py" in files:
            test_dirs.append(folder)
        if folder == "/etc/xdg/pip":
            host_pip.append(folder)
        host_pip += [os.path.join(folder, f) for f in files if f == "host-ca.pem"]
print(json.dumps({
    "on_path": {n: shutil.which(n) for n in names},
    "usr_bin": {n: os.path.realpath(f"/usr/bin/{n}") if os.path.lexists(f"/usr/bin/{n}") else None for n in names},
    "compilers": [c for c in compilers if shutil.which(c)],
    "test_dirs": test_dirs,
    "pip_caches": pip_caches,
    "host_pip": host_pip,
    "modules": [m for m in ("pytest", "hypothesis", "pip", "setuptools", "tests") if importlib.util.find_spec(m)],
    "src": os.path.exists("/src"),
}))
"""


def test_image_contents(engine: str, image: str) -> None:
    """What operators script against is there; compilers, pip caches, tests and the host's pip
    settings (handed to the build as a volume) are not."""
    result = run_once(engine, image, "/opt/nvdp/bin/python3", "-c", CONTENTS_PROBE, json.dumps(PRESENT + NOT_YET))
    assert result.returncode == 0, result.stdout + result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    for name in PRESENT:
        assert found["on_path"][name] == f"/opt/nvdp/bin/{name}"
        assert found["usr_bin"][name] == f"/opt/nvdp/bin/{name}"
    for name in NOT_YET:  # not written yet: nothing may pretend to be them
        assert found["on_path"][name] is None
    assert found["compilers"] == []
    assert found["test_dirs"] == []
    assert found["pip_caches"] == []
    assert found["host_pip"] == []
    assert found["modules"] == []
    assert found["src"] is False


@pytest.mark.parametrize("name", PRESENT)
def test_binaries_start(engine: str, image: str, name: str) -> None:
    result = run_once(engine, image, name, "--version")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{name}, version {__version__}"


def test_doctor_starts_from_the_image(engine: str, image: str) -> None:
    """`nvdp doctor` runs in the same image (here without a GPU: it must say so, not crash)."""
    result = run_once(engine, image, "nvdp", "doctor", "--json")
    assert result.returncode in (0, 1), result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is (result.returncode == 0)
    names = {check["name"] for check in report["checks"]}
    assert {"kernel-driver", "nvml-library", "nvml"} <= names
    assert "Traceback" not in result.stderr


# --- the plugin in the container -----------------------------------------------------------------

@dataclass
class Container:
    engine: str
    name: str
    config: Path  # the host file mounted (read-only, by its folder) at /config/config.yaml

    async def call(self, *args: str, timeout: float = 60) -> tuple[int, str]:
        return await engine_call(self.engine, *args, timeout=timeout)

    async def logs(self) -> str:
        return (await self.call("logs", self.name))[1]

    async def state(self) -> dict[str, Any]:
        rc, out = await self.call("inspect", "--format", "{{json .State}}", self.name)
        assert rc == 0, out
        state: dict[str, Any] = json.loads(out)
        return state


def write_config(path: Path, replicas: int | None) -> None:
    """Atomically, as a ConfigMap update lands: the container sees the new file through its folder."""
    text = "version: v1\nflags:\n  migStrategy: none\n"
    if replicas is not None:
        text += f"sharing:\n  timeSlicing:\n    resources:\n    - name: {GPU}\n      replicas: {replicas}\n"
    staging = path.with_suffix(".new")
    staging.write_text(text)
    os.replace(staging, path)


@pytest.fixture
async def plugin(engine: str, image: str, plugin_dir: Path, kubelet: FakeKubelet,
                 tmp_path: Path) -> AsyncIterator[Container]:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    config_dir.chmod(0o755)
    write_config(config_dir / "config.yaml", replicas=None)
    container = Container(engine, f"nvdp-test-{uuid.uuid4().hex[:12]}", config_dir / "config.yaml")
    rc, out = await engine_call(engine, *run_args(engine)[1:], "-d", "--name", container.name,
                                "-v", f"{plugin_dir}:{DEVICE_PLUGINS}", "-v", f"{config_dir}:/config:ro",
                                # Inside the container the default kubelet socket is the test kubelet's
                                # folder mounted there: say so (the simulate guard, docs/simulated-profiles.md).
                                image, "--simulate", "dgx-h100", "--simulate-on-real-kubelet",
                                "--config-file", "/config/config.yaml")
    assert rc == 0, out
    try:
        try:
            await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
        except TimeoutError:
            pytest.fail(f"the plugin did not register in {WAIT_S} s:\n{await container.logs()}")
        yield container
    finally:
        print(f"--- {container.name} logs ---\n{await container.logs()}")
        await engine_call(engine, "rm", "-f", *(["-t", "0"] if engine == "podman" else []), container.name)


async def test_registers_serves_allocate_and_runs_as_pid1(plugin: Container, kubelet: FakeKubelet) -> None:
    endpoint = kubelet.plugin(GPU)
    assert endpoint.endpoint == "nvidia-gpu.sock"
    devices = list(endpoint.devices)
    assert len(devices) == 8 and all(d.startswith("GPU-") for d in devices)
    response = await kubelet.allocate(GPU, devices[:2])
    assert response.envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(devices[:2])
    assert kubelet.errors == []
    # PID 1 is the plugin itself, named as the official config-manager looks for it.
    rc, cmdline = await plugin.call("exec", plugin.name, "cat", "/proc/1/cmdline")
    assert rc == 0, cmdline
    assert cmdline.split("\0")[0] == "nvidia-device-plugin"
    host_pid = (await plugin.state())["Pid"]
    assert Path(f"/proc/{host_pid}/cmdline").read_bytes().split(b"\0")[0] == b"nvidia-device-plugin"


async def test_survives_a_kubelet_restart(plugin: Container, kubelet: FakeKubelet) -> None:
    await kubelet.restart()  # deletes the plugin's socket, serves a fresh kubelet.sock
    await kubelet.wait_registered(GPU, timeout=WAIT_S, min_devices=8)
    registrations = [e for e in kubelet.events if e.kind == "register" and e.resource == GPU]
    assert len(registrations) == 2
    devices = list(kubelet.plugin(GPU).devices)
    assert (await kubelet.allocate(GPU, devices[:1])).envs["NVIDIA_VISIBLE_DEVICES"] == devices[0]
    assert kubelet.errors == []


async def test_sighup_reloads_the_mounted_config(plugin: Container, kubelet: FakeKubelet) -> None:
    write_config(plugin.config, replicas=2)
    rc, out = await plugin.call("kill", "--signal", "HUP", plugin.name)
    assert rc == 0, out

    def shared() -> bool:
        endpoint = kubelet.plugins.get(GPU)
        return endpoint is not None and endpoint.connected and len(endpoint.devices) == 16

    try:
        await kubelet.wait_for(shared, timeout=WAIT_S)
    except TimeoutError:
        pytest.fail(f"no time-sliced devices after SIGHUP:\n{await plugin.logs()}")
    devices = list(kubelet.plugin(GPU).devices)
    assert all("::" in d for d in devices)  # <uuid>::<replica>
    assert "reloaded" in await plugin.logs()
    assert (await plugin.state())["Running"] is True


async def test_sigterm_stops_it_within_2s(plugin: Container, kubelet: FakeKubelet) -> None:
    started = time.monotonic()
    rc, out = await plugin.call("stop", "-t", "10", plugin.name)  # SIGTERM, SIGKILL only after 10 s
    took = time.monotonic() - started
    assert rc == 0, out
    state = await plugin.state()
    assert state["ExitCode"] == 0, await plugin.logs()  # a clean exit, not the SIGKILL's 137
    print(f"{plugin.engine} stop took {took:.2f} s")
    assert took < 2.0, f"{plugin.engine} stop took {took:.2f} s"
    await kubelet.wait_for(lambda: not kubelet.plugin(GPU).connected, timeout=WAIT_S)
