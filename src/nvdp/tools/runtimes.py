"""Reading container runtime configuration the way each runtime does, for `nvdp doctor`.

Three runtimes, each reduced to the same facts (`RuntimeConfig`): the runtimes it knows (name ->
binary), its default runtime, whether CDI is on, and any NVIDIA OCI hook.

- containerd: `<etc>/containerd/config.toml` (k0s: `<etc>/k0s/containerd.toml`; k3s and RKE2:
  `<var>/lib/rancher/{k3s,rke2}/agent/etc/containerd/config.toml`) plus its `imports` (drop-ins such as the
  `conf.d/99-nvidia.toml` that `nvidia-ctk runtime configure` writes), merged in order with the
  later file winning, as containerd does. The CRI section is `io.containerd.cri.v1.runtime`
  (config version 3, containerd 2.x, where CDI is on by default), `io.containerd.grpc.v1.cri`
  (version 2) or `cri` (version 1).
- CRI-O: `<etc>/crio/crio.conf` then every file of `<etc>/crio/crio.conf.d/` in name order;
  `crio.runtime.default_runtime` and `crio.runtime.runtimes.<name>.runtime_path`. CRI-O always
  resolves CDI devices. NVIDIA OCI hooks are looked for in `<etc>/containers/oci/hooks.d/`.
- docker: `<etc>/docker/daemon.json`: `runtimes.<name>.path`, `default-runtime`, `features.cdi`.

Paths inside the files (containerd imports) are read under the same `<etc>` root, so a node
layout copied into a folder is read as a whole.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NVIDIA_BINARY = "nvidia-container-runtime"  # also .cdi, .legacy
NVIDIA_HOOK = "nvidia-container-runtime-hook"
CONTAINERD_CRI = {3: "io.containerd.cri.v1.runtime", 2: "io.containerd.grpc.v1.cri", 1: "cri"}


@dataclass(frozen=True)
class RuntimeConfig:
    runtime: str  # "containerd", "cri-o" or "docker"
    files: tuple[str, ...]  # what was read, in order
    runtimes: Mapping[str, str] = field(default_factory=dict)  # name -> binary ("" when not named)
    default: str = ""
    cdi: bool = False
    hooks: tuple[str, ...] = ()  # NVIDIA OCI hook files (CRI-O)
    error: str = ""  # the file could not be parsed

    @property
    def nvidia_runtimes(self) -> tuple[str, ...]:
        return tuple(n for n, binary in self.runtimes.items() if os.path.basename(binary).startswith(NVIDIA_BINARY))

    @property
    def nvidia_default(self) -> bool:
        return self.default in self.nvidia_runtimes


def _merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    """Deep merge, `other` winning (containerd's merge of imported files)."""
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def _dig(doc: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, Mapping):
            return None
        doc = doc.get(key)  # type: ignore[assignment]
    return doc


def _under(etc: Path, path: str, relative_to: Path) -> Path:
    """A path named inside a config file, read under the layout's /etc root."""
    if path.startswith("/etc/"):
        return etc / path.removeprefix("/etc/")
    return Path(path) if os.path.isabs(path) else relative_to / path


def _read_toml(files: list[Path]) -> tuple[dict[str, Any], str]:
    doc: dict[str, Any] = {}
    for path in files:
        try:
            _merge(doc, tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            return doc, f"{path}: {exc}"
    return doc, ""


def containerd_configs(etc: Path, var: Path) -> dict[str, Path]:
    """Where each containerd distribution keeps its config: the plain one, k0s (under /etc), and
    the containerd that k3s and RKE2 embed (generated under /var/lib/rancher)."""
    return {
        "containerd": etc / "containerd" / "config.toml",
        "containerd (k0s)": etc / "k0s" / "containerd.toml",
        "containerd (k3s)": var / "lib/rancher/k3s/agent/etc/containerd/config.toml",
        "containerd (rke2)": var / "lib/rancher/rke2/agent/etc/containerd/config.toml",
    }


def read_containerd(etc: Path, main: Path | None = None, label: str = "containerd") -> RuntimeConfig | None:
    main = main or etc / "containerd" / "config.toml"
    if not main.is_file():
        return None
    files = [main]
    doc, error = _read_toml(files)
    imports = doc.get("imports") if not error else None
    for pattern in imports if isinstance(imports, list) else ():
        target = _under(etc, str(pattern), main.parent)
        files += sorted(p for p in target.parent.glob(target.name) if p.is_file() and p != main)
    if len(files) > 1:
        doc, error = _read_toml(files)
    names = tuple(str(f) for f in files)
    if error:
        return RuntimeConfig(label, names, error=error)
    version = doc.get("version", 1) if isinstance(doc.get("version", 1), int) else 1
    # Drop-ins may use another version than the main file: read every CRI section, the main
    # file's version first.
    order = [CONTAINERD_CRI.get(version, CONTAINERD_CRI[2])] + [k for k in CONTAINERD_CRI.values()]
    runtimes: dict[str, str] = {}
    default = cdi = None
    for key in dict.fromkeys(order):
        section = _dig(doc, "plugins", key)
        if not isinstance(section, Mapping):
            continue
        for name, spec in (_dig(section, "containerd", "runtimes") or {}).items():
            if isinstance(spec, Mapping):
                runtimes.setdefault(name, str(_dig(spec, "options", "BinaryName") or spec.get("runtime_engine") or ""))
        if default is None and isinstance(_dig(section, "containerd", "default_runtime_name"), str):
            default = section["containerd"]["default_runtime_name"]
        if cdi is None and isinstance(section.get("enable_cdi"), bool):
            cdi = section["enable_cdi"]
    return RuntimeConfig(label, names, runtimes, default or "runc", cdi if cdi is not None else version >= 3)


def read_crio(etc: Path) -> RuntimeConfig | None:
    main = etc / "crio" / "crio.conf"
    dropins = etc / "crio" / "crio.conf.d"
    files = [main] if main.is_file() else []
    if dropins.is_dir():
        files += sorted(p for p in dropins.iterdir() if p.is_file())
    if not files:
        return None
    doc, error = _read_toml(files)
    names = tuple(str(f) for f in files)
    if error:
        return RuntimeConfig("cri-o", names, error=error)
    section = _dig(doc, "crio", "runtime") or {}
    runtimes = {
        name: str(spec.get("runtime_path") or name)
        for name, spec in (section.get("runtimes") or {}).items()
        if isinstance(spec, Mapping)
    }
    return RuntimeConfig("cri-o", names, runtimes, str(section.get("default_runtime", "crun")), True, _oci_hooks(etc))


def _oci_hooks(etc: Path) -> tuple[str, ...]:
    folder = etc / "containers" / "oci" / "hooks.d"
    if not folder.is_dir():
        return ()
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            hook = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if NVIDIA_HOOK in str(_dig(hook, "hook", "path") or ""):
            found.append(str(path))
    return tuple(found)


def read_docker(etc: Path) -> RuntimeConfig | None:
    path = etc / "docker" / "daemon.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError("the top level is not an object")
    except (OSError, ValueError) as exc:
        return RuntimeConfig("docker", (str(path),), error=f"{path}: {exc}")
    runtimes = {
        name: str(spec.get("path", "")) for name, spec in (doc.get("runtimes") or {}).items() if isinstance(spec, dict)
    }
    return RuntimeConfig(
        "docker", (str(path),), runtimes, str(doc.get("default-runtime", "runc")), _dig(doc, "features", "cdi") is True
    )


def read_all(etc: Path, var: Path) -> dict[str, RuntimeConfig]:
    """Every runtime configured under the roots, by runtime name ("containerd (k3s)", "cri-o"...)."""
    found = [read_containerd(etc, path, label) for label, path in containerd_configs(etc, var).items()]
    found += [read_crio(etc), read_docker(etc)]
    return {c.runtime: c for c in found if c is not None}
