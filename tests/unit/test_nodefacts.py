"""Facts read off node files: version strings as the driver writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvdp.tools.nodefacts import cdi_specs, kernel_module_version, library_version


@pytest.mark.parametrize(
    ("text", "version"),
    [
        pytest.param("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n",
                     "535.183.01", id="proprietary module"),
        pytest.param("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
                     "(dvs-builder@U16-I3-B08-1-1)  Tue Jul 22 ...\n", "580.65.06", id="open module"),
        pytest.param("NVRM version: NVIDIA UNIX aarch64 Kernel Module  550.54.15\n", "550.54.15", id="arm"),
        pytest.param("something else\n", "", id="unreadable format"),
    ],
)
def test_kernel_module_version(tmp_path: Path, text: str, version: str) -> None:
    path = tmp_path / "driver/nvidia/version"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    assert kernel_module_version(tmp_path) == version


def test_kernel_module_absent(tmp_path: Path) -> None:
    assert kernel_module_version(tmp_path) is None


@pytest.mark.parametrize(
    ("target", "version"),
    [
        pytest.param("libnvidia-ml.so.580.65.06", "580.65.06", id="three parts"),
        pytest.param("libnvidia-ml.so.470.82", "470.82", id="two parts"),
        pytest.param(None, "", id="a plain file"),
    ],
)
def test_library_version_follows_the_link(tmp_path: Path, target: str | None, version: str) -> None:
    link = tmp_path / "libnvidia-ml.so.1"
    if target is None:
        link.write_text("")
    else:
        (tmp_path / target).write_text("")
        link.symlink_to(target)
    assert library_version(link) == version


def test_cdi_specs_reads_yaml_and_json_and_skips_the_rest(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("kind: nvidia.com/gpu\ndevices: [{name: '0'}, {name: all}]\n")
    (tmp_path / "b.json").write_text('{"kind": "nvidia.com/gpu", "devices": [{"name": "1"}]}')
    (tmp_path / "c.yaml").write_text("{not: [yaml")
    (tmp_path / "notes.txt").write_text("kind: x/y")
    assert cdi_specs([tmp_path, tmp_path / "missing"]) == {"nvidia.com/gpu": {"0", "1", "all"}}
