"""Container runtime configuration as containerd, CRI-O and docker read it."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvdp.tools.runtimes import RuntimeConfig, read_all, read_containerd, read_crio, read_docker

NVIDIA = "/usr/bin/nvidia-container-runtime"

CONTAINERD_V2_NVIDIA_DEFAULT = f"""
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "nvidia"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
      BinaryName = "{NVIDIA}"
"""
CONTAINERD_V2_RUNC_ONLY = """
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"""
CONTAINERD_V3_PLAIN = """
version = 3
[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "runc"
"""
CONTAINERD_V1_NVIDIA_NOT_DEFAULT = f"""
[plugins.cri.containerd.runtimes.nvidia]
  runtime_type = "io.containerd.runc.v2"
  [plugins.cri.containerd.runtimes.nvidia.options]
    BinaryName = "{NVIDIA}.cdi"
"""
CONTAINERD_IMPORTS = """
version = 2
imports = ["/etc/containerd/conf.d/*.toml"]
[plugins."io.containerd.grpc.v1.cri"]
  enable_cdi = false
"""
DROPIN_NVIDIA = f"""
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  enable_cdi = true
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "nvidia"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
  BinaryName = "{NVIDIA}"
"""


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def facts(c: RuntimeConfig | None) -> tuple[object, ...] | None:
    if c is None:
        return None
    return (c.default, c.nvidia_runtimes, c.nvidia_default, c.cdi, bool(c.error))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param({}, None, id="absent"),
        pytest.param({"containerd/config.toml": CONTAINERD_V2_NVIDIA_DEFAULT},
                     ("nvidia", ("nvidia",), True, False, False), id="v2 nvidia default"),
        pytest.param({"containerd/config.toml": CONTAINERD_V2_RUNC_ONLY},
                     ("runc", (), False, False, False), id="v2 runc only"),
        pytest.param({"containerd/config.toml": CONTAINERD_V3_PLAIN},
                     ("runc", (), False, True, False), id="v3: CDI on by default"),
        pytest.param({"containerd/config.toml": CONTAINERD_V1_NVIDIA_NOT_DEFAULT},
                     ("runc", ("nvidia",), False, False, False), id="v1 nvidia.cdi binary, not default"),
        pytest.param({"containerd/config.toml": CONTAINERD_IMPORTS, "containerd/conf.d/99-nvidia.toml": DROPIN_NVIDIA},
                     ("nvidia", ("nvidia",), True, True, False), id="drop-in from imports wins"),
        pytest.param({"containerd/config.toml": CONTAINERD_IMPORTS},
                     ("runc", (), False, False, False), id="imports matching nothing"),
        pytest.param({"containerd/config.toml": "version = 2\n[plugins\n"}, ("", (), False, False, True),
                     id="broken TOML"),
    ],
)
def test_containerd(tmp_path: Path, files: dict[str, str], expected: tuple[object, ...] | None) -> None:
    assert facts(read_containerd(write(tmp_path, files))) == expected


def test_containerd_lists_every_file_read(tmp_path: Path) -> None:
    write(tmp_path, {"containerd/config.toml": CONTAINERD_IMPORTS, "containerd/conf.d/99-nvidia.toml": DROPIN_NVIDIA,
                     "containerd/conf.d/10-other.toml": "version = 2\n"})
    config = read_containerd(tmp_path)
    assert config is not None
    assert [Path(f).name for f in config.files] == ["config.toml", "10-other.toml", "99-nvidia.toml"]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param({"crio/crio.conf": '[crio.runtime]\ndefault_runtime = "crun"\n'},
                     ("crun", (), False, True, False), id="crun default"),
        pytest.param({"crio/crio.conf": '[crio.runtime]\ndefault_runtime = "crun"\n',
                      "crio/crio.conf.d/99-nvidia.conf": f'[crio.runtime]\ndefault_runtime = "nvidia"\n'
                      f'[crio.runtime.runtimes.nvidia]\nruntime_path = "{NVIDIA}"\n'},
                     ("nvidia", ("nvidia",), True, True, False), id="drop-in sets nvidia"),
        pytest.param({"crio/crio.conf.d/01.conf": "[crio.runtime\n"}, ("", (), False, False, True), id="broken"),
    ],
)
def test_crio(tmp_path: Path, files: dict[str, str], expected: tuple[object, ...]) -> None:
    assert facts(read_crio(write(tmp_path, files))) == expected


def test_crio_nvidia_hook(tmp_path: Path) -> None:
    write(tmp_path, {
        "crio/crio.conf": "",
        "containers/oci/hooks.d/oci-nvidia-hook.json":
            '{"version": "1.0.0", "hook": {"path": "/usr/bin/nvidia-container-runtime-hook"}}',
        "containers/oci/hooks.d/other.json": '{"hook": {"path": "/usr/bin/other"}}',
    })
    config = read_crio(tmp_path)
    assert config is not None and [Path(h).name for h in config.hooks] == ["oci-nvidia-hook.json"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param('{"default-runtime": "nvidia", "runtimes": {"nvidia": {"path": "nvidia-container-runtime"}}}',
                     ("nvidia", ("nvidia",), True, False, False), id="nvidia default"),
        pytest.param('{"runtimes": {"nvidia": {"path": "nvidia-container-runtime"}}}',
                     ("runc", ("nvidia",), False, False, False), id="nvidia not default"),
        pytest.param('{"features": {"cdi": true}}', ("runc", (), False, True, False), id="cdi"),
        pytest.param("{not json", ("", (), False, False, True), id="broken"),
        pytest.param("[]", ("", (), False, False, True), id="not an object"),
    ],
)
def test_docker(tmp_path: Path, text: str, expected: tuple[object, ...]) -> None:
    assert facts(read_docker(write(tmp_path, {"docker/daemon.json": text}))) == expected


def test_read_all_finds_every_distribution(tmp_path: Path) -> None:
    etc, var = tmp_path / "etc", tmp_path / "var"
    write(etc, {"containerd/config.toml": CONTAINERD_V2_RUNC_ONLY, "docker/daemon.json": "{}",
                "k0s/containerd.toml": CONTAINERD_V2_NVIDIA_DEFAULT})
    write(var, {"lib/rancher/k3s/agent/etc/containerd/config.toml": CONTAINERD_V1_NVIDIA_NOT_DEFAULT})
    found = read_all(etc, var)
    assert sorted(found) == ["containerd", "containerd (k0s)", "containerd (k3s)", "docker"]
    assert found["containerd (k0s)"].nvidia_default
    assert found["containerd (k3s)"].nvidia_runtimes == ("nvidia",) and not found["containerd (k3s)"].nvidia_default
