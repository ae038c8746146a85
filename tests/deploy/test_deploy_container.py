"""The container recipe, without a container engine: the Dockerfile's facts, and its install steps
(deployments/container/install.sh) run into a fresh venv, then the entrypoint used as the image does.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdp import __version__
from nvdp.app.procsignal import Signalled, signal_process
from nvdp.cli import IMAGE_PROGRAMS
from nvdp.testing import eventually_sync
from tests.deploy.deploy_tools import CONTAINER, ROOT

pytestmark = pytest.mark.deploy

DOCKERFILE = CONTAINER / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())  # join continuation lines
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_facts() -> None:
    instr = dockerfile_instructions()
    assert ("ENTRYPOINT", '["nvidia-device-plugin"]') in instr
    froms = [arg for op, arg in instr if op == "FROM"]
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm") in instr
    env = " ".join(arg for op, arg in instr if op == "ENV")
    for setting in ("NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility",
                    "NVIDIA_DISABLE_REQUIRE=true", "PATH=/opt/nvdp/bin:"):
        assert setting in env
    labels = " ".join(arg for op, arg in instr if op == "LABEL")
    for key in ("title", "description", "version", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert ("ARG", f"VERSION={__version__}") in instr
    assert ("RUN", "deployments/container/install.sh /opt/nvdp /src /opt/nvdp-usr-bin") in instr
    assert ("COPY", "--from=build /opt/nvdp-usr-bin/ /usr/bin/") in instr


def dockerfile_copies() -> list[str]:
    """What the build stage copies from the repository (the image's whole build context)."""
    copies = [arg.split()[:-1] for op, arg in dockerfile_instructions() if op == "COPY" and "--from" not in arg]
    return [path for sources in copies for path in sources]


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the Dockerfile's install step into a fresh venv, from a copy of what the image copies."""
    tmp = tmp_path_factory.mktemp("image")
    src = tmp / "src"
    for rel in dockerfile_copies():
        source = ROOT / rel
        if source.is_dir():
            shutil.copytree(source, src / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, src / rel)
    prefix = tmp / "opt-nvdp"
    env = {**os.environ, "PYTHON": getattr(sys, "_base_executable", sys.executable)}
    result = subprocess.run([str(src / "deployments/container/install.sh"), str(prefix), str(src),
                             str(tmp / "usr-bin")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return prefix


def usr_bin(image_venv: Path) -> Path:
    """install.sh's LINKDIR in the fixture: what the image copies to /usr/bin."""
    return image_venv.parent / "usr-bin"


def run_entrypoint(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # As the image runs it: by name, with the venv's bin first on PATH, from another directory.
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(venv)}
    return subprocess.run(["nvidia-device-plugin", *args], capture_output=True, text=True, env=env,
                          cwd="/", timeout=60)


def test_build_copies_only_the_package_sources() -> None:
    assert sorted(dockerfile_copies()) == ["README.md", "deployments/container", "pyproject.toml", "src"]


def test_entrypoint_version(image_venv: Path) -> None:
    result = run_entrypoint(image_venv, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"nvidia-device-plugin, version {__version__}"


def test_the_image_has_the_config_manager(image_venv: Path) -> None:
    """The chart's init container and sidecar run `config-manager` from the same image."""
    env = {"PATH": f"{image_venv / 'bin'}:/usr/bin:/bin", "HOME": str(image_venv)}
    result = subprocess.run(["config-manager", "--version"], capture_output=True, text=True, env=env, cwd="/",
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"config-manager, version {__version__}"
    check = subprocess.run([str(image_venv / "bin" / "python3"), "-c", "import lightkube, nvdp.kube.client"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_entrypoint_by_path_without_the_venv_on_path(image_venv: Path) -> None:
    """E.g. a pod `command:` naming /opt/nvdp/bin/nvidia-device-plugin: Python cannot find its venv
    from the bare argv[0] then, so the wrapper names the interpreter (PYTHONEXECUTABLE)."""
    result = subprocess.run([str(image_venv / "bin" / "nvidia-device-plugin"), "--version"], capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin"}, cwd="/", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"nvidia-device-plugin, version {__version__}"


def test_the_image_ships_the_mps_control_daemon(image_venv: Path) -> None:
    """The chart's MPS DaemonSet runs `mps-control-daemon` and `mps-control-daemon mount-shm` from PATH."""
    script = image_venv / "bin" / "mps-control-daemon"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"mps-control-daemon, version {__version__}"
    help_text = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "mount-shm" in help_text and "--mps-dir" in help_text


def install_binaries() -> list[str]:
    match = re.search(r"^binaries=\(([^)]*)\)", (CONTAINER / "install.sh").read_text(), flags=re.MULTILINE)
    assert match is not None
    return match.group(1).split()


def test_the_image_binaries_are_the_official_names_nvdp_has() -> None:
    """Three of the official image's four (config-manager is another issue); each one is a program
    of the entrypoint, so no name in the image starts the wrong program."""
    assert install_binaries() == ["nvidia-device-plugin", "gpu-feature-discovery", "mps-control-daemon"]
    assert sorted(IMAGE_PROGRAMS) == sorted(install_binaries())


@pytest.mark.parametrize("name", install_binaries())
def test_each_binary_is_the_argv0_wrapper_by_name_and_by_link(image_venv: Path, name: str) -> None:
    installed = image_venv / "bin" / name
    assert installed.read_bytes() == (CONTAINER / "argv0-wrapper").read_bytes()  # not pip's script
    link = usr_bin(image_venv) / name
    assert link.is_symlink() and link.resolve() == installed.resolve()
    env = {"PATH": f"{image_venv / 'bin'}:/usr/bin:/bin", "HOME": str(image_venv)}
    for argv in ([name], [str(link)]):  # by name on PATH, and as /usr/bin/<name> without the venv on PATH
        result = subprocess.run([*argv, "--version"], capture_output=True, text=True, cwd="/", timeout=60,
                                env=env if argv == [name] else {"PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{name}, version {__version__}"


def test_the_entrypoint_runs_the_plugin_for_another_argv0(image_venv: Path) -> None:
    python = image_venv / "bin" / "python3"
    result = subprocess.run(["bash", "-c", f'exec -a something-else "{python}" -m nvdp.entrypoint --version'],
                            capture_output=True, text=True, cwd="/", timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PYTHONEXECUTABLE": str(python)})  # as the wrapper sets it
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"nvidia-device-plugin, version {__version__}"


def test_entrypoint_help_lists_the_official_flags(image_venv: Path) -> None:
    result = run_entrypoint(image_venv, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: nvidia-device-plugin [OPTIONS]")
    for flag in ("--mig-strategy", "--fail-on-init-error", "--pass-device-specs", "--device-list-strategy",
                 "--device-id-strategy", "--nvidia-driver-root", "--config-file"):
        assert flag in result.stdout


def test_entrypoint_rejects_a_bad_flag_value(image_venv: Path) -> None:
    result = run_entrypoint(image_venv, "--mig-strategy=dual")
    assert result.returncode == 2
    assert "--mig-strategy" in result.stderr


@pytest.fixture
def image_plugin(image_venv: Path, plugin_dir: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """The plugin started through the image's entrypoint on a simulated node (no kubelet)."""
    env = {"PATH": f"{image_venv / 'bin'}:/usr/bin:/bin", "NVDP_SIMULATE": "h200",
           "KUBELET_SOCKET": str(plugin_dir / "kubelet.sock")}
    log = plugin_dir / "plugin.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["nvidia-device-plugin"], stdout=out, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd="/")
    try:
        def serving() -> bool:
            assert proc.poll() is None, log.read_text()
            return (plugin_dir / "nvidia-gpu.sock").exists()

        eventually_sync(serving, "the plugin's socket", timeout_s=30, poll_s=0.05, detail=log.read_text)
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def pids_named(name: str) -> list[int]:
    """How the official config-manager finds the process to signal: argv[0] equals the name."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0] == name.encode():
                found.append(int(entry.name))
    return found


def wait_for(log: Path, text: str, timeout: float = 15) -> None:
    eventually_sync(lambda: text in log.read_text(), f"{text!r} in the log", timeout_s=timeout, poll_s=0.05,
                    detail=log.read_text)


def test_argv0_is_exactly_the_plugin_name_and_sighup_reloads(
    image_plugin: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, log = image_plugin
    argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    assert argv[0] == b"nvidia-device-plugin"
    assert proc.pid in pids_named("nvidia-device-plugin")  # the wrapper exec'd: no shell left between
    os.kill(proc.pid, signal.SIGHUP)  # what config-manager sends (SIGNAL=1)
    wait_for(log, "reloaded")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0, log.read_text()


def start_from_the_image(image_venv: Path, log: Path, *argv: str, **env: str) -> subprocess.Popen[str]:
    with log.open("w") as out:
        return subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, text=True, cwd="/",
                                env={"PATH": f"{image_venv / 'bin'}:/usr/bin:/bin", **env})


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def test_gfd_argv0_is_exactly_its_name_and_sighup_reloads(image_venv: Path, tmp_path: Path) -> None:
    """The official chart's GFD config-manager signals the process named `gpu-feature-discovery`."""
    features = tmp_path / "features.d" / "gfd"
    log = tmp_path / "gfd.log"
    proc = start_from_the_image(image_venv, log, "gpu-feature-discovery", "--simulate", "h200",
                                "--output-file", str(features), "--use-node-feature-api=false",
                                "--sleep-interval", "infinite")
    try:
        eventually_sync(features.exists, "the feature file", timeout_s=30, poll_s=0.05, detail=log.read_text)
        assert Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0] == b"gpu-feature-discovery"
        assert proc.pid in pids_named("gpu-feature-discovery")
        assert "nvidia.com/gpu.product=NVIDIA-H200" in features.read_text()
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(log, "reloaded on SIGHUP")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        stop(proc)


def test_the_mps_daemon_is_found_by_the_official_process_name(image_venv: Path, tmp_path: Path) -> None:
    """The chart's MPS sidecar signals PROCESS_TO_SIGNAL=/usr/bin/mps-control-daemon, as the official
    chart's does: the wrapper gives the daemon exactly that argv[0], and nvdp's config-manager finds
    it and its SIGHUP reaches the daemon (a node without MPS resources: it waits for SIGHUP)."""
    env = {"PATH": f"{image_venv / 'bin'}:/usr/bin:/bin", "NVDP_SIMULATE": "h200"}
    log = tmp_path / "mps.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["mps-control-daemon", "--mps-dir", str(tmp_path / "mps")], stdout=out,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd="/")
    try:
        wait_for(log, "waiting for SIGHUP")
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert argv[0] == b"/usr/bin/mps-control-daemon"
        assert proc.pid in pids_named("/usr/bin/mps-control-daemon")
        assert asyncio.run(signal_process("/usr/bin/mps-control-daemon", signal.SIGHUP)) is Signalled.SENT
        wait_for(log, "SIGHUP: restarting")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
