"""scripts/build-image's pure parts: where the Debian mirror comes from, and what keys the image cache."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def build_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("build_image", str(ROOT / "scripts" / "build-image"))
    spec = importlib.util.spec_from_loader("build_image", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


BUILD = build_script()


def test_apt_sources_reads_one_line_and_deb822_files(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main  # trailing\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n"
        "# http://snapshot.example/archive\n"
        "URIs: http://two.example/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "URIs: http://three.example/debian-security\n"
        "Suites: bookworm-security\n"
        "\n"
        "Types: deb\n"
        "URIs: http://off.example/debian\n"
        "Suites: bookworm\n"
        "Enabled: no\n"
    )
    (tmp_path / "sources.list.d" / "other.list.disabled").write_text("deb http://never.example/ bookworm main\n")
    assert BUILD.apt_sources(tmp_path) == [
        ("http://one.example/debian", ["bookworm"]),
        ("http://two.example/debian", ["bookworm", "bookworm-updates"]),
        ("http://three.example/debian-security", ["bookworm-security"]),
    ]


def test_the_cache_key_covers_what_the_dockerfile_copies() -> None:
    assert sorted(BUILD.copied_paths()) == ["README.md", "deployments/container", "pyproject.toml", "src"]
    assert BUILD.ignored(Path("src/nvdp/__pycache__/cli.cpython-311.pyc"))
    assert BUILD.ignored(Path("src/nvdp.egg-info/SOURCES.txt"))
    assert not BUILD.ignored(Path("src/nvdp/cli.py"))


def test_the_cache_key_changes_with_the_inputs() -> None:
    args = {"PYTHON_IMAGE": "base", "VERSION": "1"}
    key = BUILD.inputs_key(args, "sha256:aaa")
    assert key == BUILD.inputs_key(dict(args), "sha256:aaa")
    assert key != BUILD.inputs_key(args, "sha256:bbb")
    assert key != BUILD.inputs_key({**args, "VERSION": "2"}, "sha256:aaa")


def test_the_default_base_is_the_slim_python_image() -> None:
    assert BUILD.dockerfile_default_base() == "python:3.11-slim-bookworm"
