"""`nvdp cdi generate|list`, and the check `nvdp doctor` runs on the CDI spec on disk.

The same generator as the running plugin (`app.cdi.generate`): the node from the configured
backend, the driver root from the flags (or the simulated node's own root), the same options. It is
what `nvidia-ctk cdi generate --vendor=k8s.device-plugin.nvidia.com --class=gpu` is to the official
plugin, without the chance of a different vendor, class or naming strategy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvdp.app.cdi import generate
from nvdp.app.discovery import BackendFactory, discover, open_backend
from nvdp.backends.driver_root import Roots, scan
from nvdp.config.options import Config
from nvdp.core.cdi import GPU_CLASS, SpecSet, SpecSettings, build_specs, handed_out, to_json, uses_cdi
from nvdp.core.container import CDI_VENDOR
from nvdp.core.devices import DeviceTree, Node
from nvdp.errors import CdiSpecError

GPU_KIND = f"{CDI_VENDOR}/{GPU_CLASS}"
GPU_FILE = f"{CDI_VENDOR}-{GPU_CLASS}.json"
# The newest cdiVersion podman 4.3 and containerd 1.7-era runtimes read.
OLDEST_CONSUMERS_MAX = (0, 5, 0)


@dataclass(frozen=True)
class Generated:
    node: Node
    tree: DeviceTree
    specs: SpecSet
    temporary_root: bool  # a simulated node's driver root that is removed on exit


def generate_specs(cfg: Config, backend_factory: BackendFactory = open_backend, vendor: str = CDI_VENDOR) -> Generated:
    """Discover, scan and build, as the plugin does at start; raises DiscoveryError, ConfigError
    or CdiSpecError."""
    backend = backend_factory(cfg)
    try:
        node, plan = discover(backend, cfg)
        specs = generate(cfg, node, backend, vendor)
    finally:
        backend.close()
    return Generated(node, plan.tree, specs, temporary_root=bool(cfg.simulate) and cfg.driver_root == "/")


def render(doc: dict[str, Any], fmt: str) -> str:
    if fmt == "yaml":
        import yaml  # only for this output: the plugin never needs it

        return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
    return to_json(doc)


# --------------------------------------------------------------------------------------------
# The doctor's check


@dataclass(frozen=True)
class Finding:
    status: str  # pass, warn, fail, skip (doctor.Status values)
    summary: str
    details: tuple[str, ...] = ()
    fix: str = ""


def _load(path: Path) -> dict[str, Any] | str:
    """The spec document, or why it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read it: {exc}"
    try:
        doc = json.loads(text) if path.suffix == ".json" else _yaml(text)
    except ValueError as exc:
        return f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
    if not isinstance(doc, dict):
        return "not a CDI spec (no mapping at the top)"
    return doc


def _yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc


def _names(doc: dict[str, Any]) -> list[str]:
    return [str(d.get("name")) for d in doc.get("devices") or () if isinstance(d, dict)]


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError:
        return (99,)


def _spec_files(folders: Iterable[Path]) -> list[Path]:
    files: dict[Path, Path] = {}  # real path -> as found (a folder may be searched twice: /run, /var/run)
    for folder in folders:
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
                files.setdefault(path.resolve(), path)
    return list(files.values())


def _writable(folder: Path) -> bool:
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("/"))
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def check_specs(cfg: Config, tree: DeviceTree, spec_dir: Path | None, search: Sequence[Path],
                expected: SpecSet | None = None) -> Finding:
    """Does the gpu spec define every name the plugin hands out, once, in a version runtimes read?

    `spec_dir`: nvdp's own folder (--cdi-spec-dir), None when writing is off; `search`: every folder
    a runtime reads; `expected`: what nvdp would write now, to spot a stale file.
    """
    wanted = handed_out(tree, cfg.device_id_strategy)
    own = spec_dir / GPU_FILE if spec_dir is not None else None
    defined: dict[str, list[Path]] = {}
    found: dict[Path, dict[str, Any]] = {}
    broken: list[str] = []
    for path in _spec_files([*([spec_dir] if spec_dir else []), *search]):
        doc = _load(path)
        if isinstance(doc, str):
            if path == own or path.name.startswith(CDI_VENDOR):
                broken.append(f"{path}: {doc}")
            continue
        if doc.get("kind") == GPU_KIND:
            found[path] = doc
            for name in _names(doc):
                defined.setdefault(name, []).append(path)
    details = tuple(f"{p}: {len(_names(d))} device(s), cdiVersion {d.get('cdiVersion')}" for p, d in found.items())
    regenerate = "nvdp cdi generate --output " + str(own or f"/var/run/cdi/{GPU_FILE}")
    if broken:
        return Finding("fail", f"unreadable CDI spec: {broken[0]}", details + tuple(broken[1:]),
                       f"remove or regenerate it: {regenerate}")
    if not found and own is None:
        return Finding("fail", f"no CDI spec of kind {GPU_KIND} in {', '.join(map(str, search))}: the runtime "
                       "cannot resolve the names Allocate returns", details,
                       f"let nvdp write it (--cdi-spec-dir=/var/run/cdi) or {regenerate}")
    if not found and own is not None:
        why = "" if _writable(own.parent) else f"; {own.parent} is not writable by this user"
        return Finding("fail", f"nvdp's CDI spec {own} does not exist{why}: the runtime cannot resolve the names "
                       "Allocate returns", details,
                       "mount the node's /var/run/cdi read-write into the plugin (--cdi-spec-dir) and look for 'CDI "
                       f"spec not written' in its log; or {regenerate}")
    missing = sorted(wanted - defined.keys())
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        return Finding("fail", f"{len(missing)} device name(s) the plugin hands out are in no {GPU_KIND} spec: "
                       f"{shown}", details, f"restart the plugin or send it SIGHUP, or {regenerate}")
    twice = sorted(n for n, paths in defined.items() if len(paths) > 1)
    if twice:
        files = sorted({str(p) for n in twice for p in defined[n]})
        return Finding("fail", f"{len(twice)} device name(s) are defined in more than one spec file "
                       f"({', '.join(files)}): runtimes refuse conflicting devices", details,
                       "keep one spec per kind: remove the one nvdp does not write (e.g. from nvidia-ctk cdi generate)")
    if own is not None and own not in found:
        others = ", ".join(map(str, found))
        return Finding("warn", f"nvdp's CDI spec {own} does not exist; {others} defines the names for now, and "
                       "conflicts with nvdp's once nvdp writes it", details,
                       f"remove {others} and let nvdp write its spec (look for 'CDI spec not written' in the plugin's "
                       "log), or set --cdi-spec-dir='' to keep using it")
    newest = max(found.values(), key=lambda d: _version(str(d.get("cdiVersion", "0"))))
    version = str(newest.get("cdiVersion", ""))
    if _version(version) > OLDEST_CONSUMERS_MAX:
        return Finding("warn", f"cdiVersion {version}: podman 4.3 and containerd 1.7-era runtimes refuse it",
                       details, "--cdi-feature-flags=no-additional-gids-for-device-nodes keeps the spec at 0.5.0")
    if own is not None and expected is not None and found.get(own) != expected.specs[0].doc:
        return Finding("warn", f"{own} differs from what nvdp generates for this node now (driver upgraded, "
                       "devices changed?)", details + _differences(found[own], expected.specs[0].doc),
                       "the plugin rewrites it on its next start or SIGHUP")
    where = own if own is not None else next(iter(found))
    return Finding("pass", f"{where} defines all {len(wanted)} name(s) the plugin hands out (cdiVersion {version})",
                   details)


def _differences(on_disk: dict[str, Any], now: dict[str, Any]) -> tuple[str, ...]:
    lines = []
    old, new = set(_names(on_disk)), set(_names(now))
    if new - old:
        lines.append(f"devices not on disk: {', '.join(sorted(new - old)[:4])}")
    if old - new:
        lines.append(f"devices no longer on the node: {', '.join(sorted(old - new)[:4])}")
    mounts = [{m.get("hostPath") for m in (d.get("containerEdits") or {}).get("mounts") or ()} for d in (on_disk, now)]
    if mounts[0] != mounts[1]:
        lines.append(f"mounts differ: {len(mounts[1] - mounts[0])} new, {len(mounts[0] - mounts[1])} gone")
    return tuple(lines) or ("other fields differ",)


def doctor_check(cfg: Config, node: Node | None, tree: DeviceTree | None, roots: Roots, run_root: Path,
                 etc_root: Path, simulated: bool,
                 expected_for: Callable[[Node], SpecSet] | None = None) -> Finding:
    """The cdi-specs check of `nvdp doctor` (folders re-rooted under --run-root / --etc-root)."""
    if not uses_cdi(cfg):
        return Finding("skip", f"not used with --device-list-strategy={','.join(cfg.device_list_strategy)}")
    if node is None or tree is None:
        return Finding("skip", "no discovery (see nvml): the names the plugin hands out are unknown")
    spec_dir = _rerooted(cfg.cdi_spec_dir, run_root) if cfg.cdi_spec_dir else None
    expected = None
    if not simulated:  # a simulated root is a temporary folder of the plugin process: paths differ
        try:
            expected = (expected_for or (lambda n: _expected(cfg, n, roots)))(node)
        except CdiSpecError as exc:
            return Finding("fail", f"nvdp cannot generate the CDI spec on this node: {exc}",
                           fix="set --driver-root to where the driver is installed")
    return check_specs(cfg, tree, spec_dir, [etc_root / "cdi", run_root / "cdi"], expected)


def _rerooted(folder: str, run_root: Path) -> Path:
    """/var/run/cdi and /run/cdi under the node's --run-root; any other folder as given."""
    for prefix in ("/var/run/", "/run/"):
        if folder.startswith(prefix):
            return run_root / folder.removeprefix(prefix)
    return Path(folder)


def _expected(cfg: Config, node: Node, roots: Roots) -> SpecSet:
    settings = SpecSettings.from_config(cfg, driver_root=roots.host_driver, dev_root=roots.host_dev)
    facts = scan(roots, node, settings.features, settings.imex_channel_ids, settings.feature_flags)
    return build_specs(node, facts, settings)
