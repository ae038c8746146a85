"""The `config-manager` console script as the chart runs it: env vars in, exit codes out."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from nvdp.testing import eventually
from nvdp.testing.configmap import write_configmap
from nvdp.testing.fake_apiserver import FakeApiServer

SCRIPT = str(Path(sys.executable).parent / "config-manager")
LABEL = "nvidia.com/device-plugin.config"


def chart_env(tmp_path: Path, api_url: str | None, **extra: str) -> dict[str, str]:
    """The env the official chart gives the init container (ONESHOT=true), plus a kubeconfig."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "KUBECONFIG", "NVDP_"))}
    env.update(ONESHOT="true", NODE_NAME="n1", NODE_LABEL=LABEL, CONFIG_FILE_SRCDIR=str(tmp_path / "configs"),
               CONFIG_FILE_DST=str(tmp_path / "config" / "config.yaml"), DEFAULT_CONFIG="",
               FALLBACK_STRATEGIES="named,single", SEND_SIGNAL="false", SIGNAL="", PROCESS_TO_SIGNAL="",
               KUBECONFIG="")
    if api_url is not None:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": api_url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        env["KUBECONFIG"] = str(kubeconfig)
    env.update(extra)
    return env


async def run(env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(SCRIPT, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    write_configmap(str(tmp_path / "configs"), {"default": "version: v1\n", "b": "version: v1\n"})
    (tmp_path / "config").mkdir()
    return tmp_path


async def test_init_container_applies_the_label_and_exits_0(folders: Path) -> None:
    async with FakeApiServer() as api:
        api.put_node("n1", {LABEL: "b"})
        code, out = await run(chart_env(folders, api.url))
    assert code == 0, out
    assert os.readlink(folders / "config" / "config.yaml") == str(folders / "configs" / "b")
    assert "config applied" in out


async def test_sidecar_ends_cleanly_on_sigterm(folders: Path) -> None:
    async with FakeApiServer() as api:
        api.put_node("n1", {})
        env = chart_env(folders, api.url, ONESHOT="false", SEND_SIGNAL="true", SIGNAL="1",
                        PROCESS_TO_SIGNAL="nvdp-test-nobody")
        proc = await asyncio.create_subprocess_exec(SCRIPT, env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        await api.wait_for(lambda: api.watch_count == 1, timeout=60)
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()


@pytest.mark.parametrize(
    ("env", "code", "fragment"),
    [
        pytest.param({"NODE_NAME": ""}, 2, "--node-name (NODE_NAME): must not be empty", id="no node name"),
        pytest.param({"FALLBACK_STRATEGIES": "first"}, 2, "unknown fallback strategy", id="bad fallback"),
        pytest.param({}, 2, "KUBERNETES_SERVICE_HOST", id="not in a pod and no kubeconfig"),
    ],
)
async def test_bad_settings_exit_2(folders: Path, env: dict[str, str], code: int, fragment: str) -> None:
    returncode, out = await run(chart_env(folders, None, **env))
    assert (returncode, fragment in out, "Traceback" in out) == (code, True, False), out


async def test_a_missing_config_folder_exits_1_naming_it(folders: Path) -> None:
    async with FakeApiServer() as api:
        api.put_node("n1", {})
        code, out = await run(chart_env(folders, api.url, CONFIG_FILE_SRCDIR=str(folders / "nope")))
    assert code == 1 and str(folders / "nope") in out and "Traceback" not in out, out


async def test_a_destination_that_is_a_file_exits_1_and_stays(folders: Path) -> None:
    dst = folders / "config" / "config.yaml"
    dst.write_text("mine\n")
    async with FakeApiServer() as api:
        api.put_node("n1", {})
        code, out = await run(chart_env(folders, api.url))
    assert code == 1 and "not a symlink" in out and dst.read_text() == "mine\n", out


async def test_nvdp_config_manager_is_the_same_command(folders: Path) -> None:
    proc = await asyncio.create_subprocess_exec(str(Path(sys.executable).parent / "nvdp"), "config-manager",
                                                "--help", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    for flag in ("--node-name", "--node-label", "--config-file-srcdir", "--config-file-dst", "--default-config",
                 "--fallback-strategies", "--oneshot", "--send-signal", "--signal", "--process-to-signal",
                 "--kubeconfig"):
        assert flag in out.decode()
    await eventually(lambda: proc.returncode == 0, "nvdp config-manager --help")
