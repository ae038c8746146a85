"""CDI specs for the names Allocate hands out: node facts + driver-root facts + settings -> spec documents.

Pure: the driver root is scanned elsewhere (`backends.driver_root`) into `DriverFacts`, whose paths
are as seen inside the driver root (`/usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05`) and the dev
root (`/dev/nvidiactl`). Here they become container paths (unchanged) and host paths (under the
host's `--driver-root` / `--dev-root`), as the official plugin rewrites `/driver-root` to the host's
driver root.

What is in the spec, the naming rule and the cdiVersion rule: docs/cdi.md. In short:
- kind `k8s.device-plugin.nvidia.com/gpu`; one device per GPU and per MIG device, named as
  `container.runtime_ids` names them (UUID, or index `0` / `1:0`), sorted by name, no `all`;
- common edits: `NVIDIA_VISIBLE_DEVICES=void` and `NVIDIA_CTK_LIBCUDA_DIR`, the control nodes that
  exist, read-only mounts of the driver's libraries, binaries, firmware and config files, the IPC
  sockets, and six createContainer hooks (unless disabled);
- `cdiVersion`: the lowest version whose features the spec uses (0.5.0 for `hostPath` on device
  nodes and names starting with a digit; 0.7.0 only with `additionalGids`, which podman 4.3 and
  containerd 1.7-era runtimes refuse);
- feature specs (`gds`, `mofed`, `gdrcopy` as `=all`, `imex-channel=<id>`) when the feature is on
  and its device nodes exist; an empty one is not written and its names are not handed out.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nvdp.config import cdi as names
from nvdp.config.options import Config
from nvdp.core import mig
from nvdp.core.container import CDI_VENDOR, runtime_ids
from nvdp.core.container import uses_cdi as uses_cdi  # re-exported: it lives where the strategies do
from nvdp.core.devices import DeviceTree, GpuInfo, MigInfo, Node

GPU_CLASS = "gpu"
IMEX_CLASS = "imex-channel"
# The `=all` feature classes in the order Allocate names them (the official plugin's order).
FEATURE_CLASSES = ("gdrcopy", "gds", "mofed")
CLASSES = (GPU_CLASS, *FEATURE_CLASSES, IMEX_CLASS)  # every spec nvdp may write, the GPUs first
RO_MOUNT = ("ro", "nosuid", "nodev", "rbind", "rprivate")
SOCKET_MOUNT = ("nosuid", "nodev", "noexec", "rbind", "rprivate")  # writable: clients connect to it
HOOK_ENV = ("NVIDIA_CTK_DEBUG=false",)

Doc = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Library:
    """One driver library file and the soname links the ld cache (or its folder) has for it."""

    path: str  # in the driver root: /usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05
    links: tuple[str, ...] = ()  # link names in the same folder: ("libcuda.so.1",)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def folder(self) -> str:
        return posixpath.dirname(self.path)


@dataclass(frozen=True)
class DrmNodes:
    """A GPU's DRM nodes (for graphics): `/dev/dri/card1`, `/dev/dri/renderD128`."""

    bus_id: str  # sysfs form, 0000:3b:00.0 (the by-path link names use it)
    card: str | None = None
    render: str | None = None
    gids: tuple[int, ...] = ()  # groups of the nodes that others may not open


@dataclass(frozen=True)
class DriverFacts:
    """What the driver root and the dev root hold, paths as seen inside those roots."""

    version: str
    libraries: tuple[Library, ...]
    binaries: tuple[str, ...] = ()
    firmware: tuple[str, ...] = ()
    ipc_sockets: tuple[str, ...] = ()
    config_files: tuple[str, ...] = ()
    control_nodes: tuple[str, ...] = ()  # /dev/nvidiactl, /dev/nvidia-uvm, ... that exist
    drm: Mapping[str, DrmNodes] = field(default_factory=dict)  # GPU UUID -> its DRM nodes
    # Feature class -> device nodes found (gds: /dev/nvidia-fs*, mofed: /dev/infiniband/..., gdrcopy:
    # /dev/gdrdrv) and files to mount with them (gds: /etc/cufile.json, /run/udev).
    feature_nodes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    feature_mounts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    imex_channels: Mapping[int, str] = field(default_factory=dict)  # channel id -> its node, if present


@dataclass(frozen=True)
class SpecSettings:
    """The options that shape the specs (from Config; the vendor is only changed by tests)."""

    driver_root: str = "/"  # host side: where the host's files are
    dev_root: str = "/"
    id_strategy: str = "uuid"
    hook_path: str = "/usr/bin/nvidia-ctk"
    disabled_hooks: frozenset[str] = frozenset()
    feature_flags: frozenset[str] = frozenset()
    features: frozenset[str] = frozenset()  # enabled feature classes: gds, mofed, gdrcopy
    imex_channel_ids: tuple[int, ...] = ()
    vendor: str = CDI_VENDOR

    @classmethod
    def from_config(cls, cfg: Config, driver_root: str | None = None, dev_root: str | None = None,
                    vendor: str = CDI_VENDOR) -> SpecSettings:
        enabled = {"gdrcopy": cfg.gdrcopy_enabled, "gds": cfg.gds_enabled, "mofed": cfg.mofed_enabled}
        return cls(
            driver_root=cfg.driver_root if driver_root is None else driver_root,
            dev_root=cfg.dev_root if dev_root is None else dev_root,
            id_strategy=cfg.device_id_strategy,
            hook_path=cfg.nvidia_cdi_hook_path,
            disabled_hooks=frozenset(cfg.cdi_disable_hooks),
            feature_flags=frozenset(cfg.cdi_feature_flags),
            features=frozenset(c for c, on in enabled.items() if on),
            imex_channel_ids=cfg.imex_channel_ids,
            vendor=vendor,
        )

    def hook_enabled(self, name: str) -> bool:
        return names.ALL_HOOKS not in self.disabled_hooks and name not in self.disabled_hooks


# --------------------------------------------------------------------------------------------
# Output


@dataclass(frozen=True)
class Spec:
    """One spec document and the class it is written for."""

    cls: str
    doc: Doc

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def device_names(self) -> tuple[str, ...]:
        return tuple(str(d["name"]) for d in self.doc["devices"])

    def file_name(self) -> str:
        """`k8s.device-plugin.nvidia.com-gpu.json`, the official plugin's file names."""
        vendor, _, cls = self.kind.partition("/")
        return f"{vendor}-{cls}.json"

    def qualified_names(self) -> tuple[str, ...]:
        return tuple(f"{self.kind}={n}" for n in self.device_names)


@dataclass(frozen=True)
class SpecSet:
    """The specs to write (gpu first) and what is worth a warning about them."""

    specs: tuple[Spec, ...]
    notes: tuple[str, ...] = ()

    @property
    def classes(self) -> frozenset[str]:
        return frozenset(s.cls for s in self.specs)

    def get(self, cls: str) -> Spec | None:
        return next((s for s in self.specs if s.cls == cls), None)


def to_json(doc: Doc) -> str:
    """The file text: stable key order as built, two-space indent, one trailing newline."""
    return json.dumps(doc, indent=2) + "\n"


def file_name(vendor: str, cls: str) -> str:
    return f"{vendor}-{cls}.json"


# --------------------------------------------------------------------------------------------
# Building


class _Paths:
    """Root-relative paths -> host paths (the official plugin's /driver-root rewrite)."""

    def __init__(self, settings: SpecSettings) -> None:
        self.driver_root = settings.driver_root
        self.dev_root = settings.dev_root

    @staticmethod
    def _under(root: str, path: str) -> str:
        return path if root in ("", "/") else posixpath.join(root, path.lstrip("/"))

    def host(self, path: str) -> str:
        return self._under(self.driver_root, path)

    def dev(self, path: str) -> str:
        return self._under(self.dev_root, path)

    def node(self, path: str) -> Doc:
        return {"path": path, "hostPath": self.dev(path)}

    def mount(self, path: str, options: Sequence[str] = RO_MOUNT) -> Doc:
        return {"hostPath": self.host(path), "containerPath": path, "options": list(options)}


def _hook(settings: SpecSettings, name: str, *args: str) -> Doc | None:
    if not settings.hook_enabled(name):
        return None
    if name == names.CREATE_SYMLINKS and not args:
        return None  # nothing to link: the toolkit leaves the hook out too
    program = posixpath.basename(settings.hook_path)
    # nvidia-cdi-hook takes the hook name directly; nvidia-ctk (the default) as `nvidia-ctk hook <name>`.
    argv = [program, name] if program == "nvidia-cdi-hook" else [program, "hook", name]
    return {"hookName": "createContainer", "path": settings.hook_path, "args": [*argv, *args],
            "env": list(HOOK_ENV)}


def _links(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """create-symlinks arguments `--link <target>::<link>`, sorted and without repeats."""
    args: list[str] = []
    for target, link in sorted(set(pairs), key=lambda p: (p[1], p[0])):
        args += ["--link", f"{target}::{link}"]
    return args


def _libcuda(facts: DriverFacts) -> Library | None:
    return next((lib for lib in facts.libraries if lib.name.startswith("libcuda.so.")), None)


def _library_links(facts: DriverFacts) -> list[tuple[str, str]]:
    """Soname links for every library, and `libcuda.so` for programs that link with -lcuda."""
    pairs = [(lib.name, posixpath.join(lib.folder, link)) for lib in facts.libraries for link in lib.links]
    libcuda = _libcuda(facts)
    if libcuda is not None:
        pairs.append(("libcuda.so.1", posixpath.join(libcuda.folder, "libcuda.so")))
    return pairs


def _graphics_links(facts: DriverFacts) -> list[tuple[str, str]]:
    """The GBM backend link the EGL/GBM loaders look for."""
    allocator = next((lib for lib in facts.libraries if lib.name.startswith("libnvidia-allocator.so.")), None)
    if allocator is None:
        return []
    return [("../libnvidia-allocator.so.1", posixpath.join(allocator.folder, "gbm", "nvidia-drm_gbm.so"))]


def common_edits(facts: DriverFacts, settings: SpecSettings) -> Doc:
    paths = _Paths(settings)
    env = []
    libcuda = _libcuda(facts)
    if libcuda is not None:
        env.append(f"NVIDIA_CTK_LIBCUDA_DIR={libcuda.folder}")
    env.append("NVIDIA_VISIBLE_DEVICES=void")
    mounts = [paths.mount(p) for p in facts.binaries]
    mounts += [paths.mount(lib.path) for lib in sorted(facts.libraries, key=lambda lib: lib.path)]
    mounts += [paths.mount(p) for p in (*facts.config_files, *facts.firmware)]
    mounts += [paths.mount(p, SOCKET_MOUNT) for p in facts.ipc_sockets]
    folders = sorted({lib.folder for lib in facts.libraries})
    hooks = [
        _hook(settings, names.CREATE_SYMLINKS, *_links(_graphics_links(facts))),
        _hook(settings, names.CREATE_SYMLINKS, *_links(_library_links(facts))),
        _hook(settings, names.ENABLE_CUDA_COMPAT, f"--host-driver-version={facts.version}"),
        _hook(settings, names.UPDATE_LDCACHE, *(a for f in folders for a in ("--folder", f))),
        _hook(settings, names.DISABLE_DEVICE_NODE_MODIFICATION),
        _hook(settings, names.UPDATE_APPLICATION_PROFILE),
    ]
    edits: Doc = {"env": env, "deviceNodes": [paths.node(p) for p in facts.control_nodes], "mounts": mounts}
    present = [h for h in hooks if h is not None]
    if present:
        edits["hooks"] = present
    return edits


def device_name(gpu: GpuInfo, device: MigInfo | None, id_strategy: str) -> str:
    """The name Allocate hands out for a GPU or a MIG device (see `container.runtime_ids`)."""
    if id_strategy == "index":
        return str(gpu.index) if device is None else f"{gpu.index}:{device.slot}"
    return gpu.uuid if device is None else device.uuid


def _gpu_device(gpu: GpuInfo, facts: DriverFacts, settings: SpecSettings) -> Doc:
    paths = _Paths(settings)
    nodes = [paths.node(gpu.device_path)]
    edits: Doc = {"deviceNodes": nodes}
    drm = facts.drm.get(gpu.uuid)
    if drm is not None:
        nodes += [paths.node(n) for n in (drm.card, drm.render) if n]
        # Links the graphics stack looks up by PCI address; container paths (the official plugin
        # leaves its /driver-root prefix in these, which resolve to nothing in the container).
        pairs = [(f"../{posixpath.basename(n)}", f"/dev/dri/by-path/pci-{drm.bus_id}-{kind}")
                 for n, kind in ((drm.card, "card"), (drm.render, "render")) if n]
        hook = _hook(settings, names.CREATE_SYMLINKS, *_links(pairs))
        if hook is not None:
            edits["hooks"] = [hook]
        if drm.gids and names.NO_ADDITIONAL_GIDS not in settings.feature_flags:
            edits["additionalGids"] = sorted(set(drm.gids))
    return {"name": device_name(gpu, None, settings.id_strategy), "containerEdits": edits}


def _mig_device(gpu: GpuInfo, device: MigInfo, node: Node, settings: SpecSettings) -> tuple[Doc | None, str]:
    caps, missing = mig.capability_paths(gpu, device, node.mig_minors)
    name = device_name(gpu, device, settings.id_strategy)
    if missing:
        return None, (f"MIG device {name} is left out of the CDI spec: {mig.MIG_MINORS_PATH} has no "
                      f"{' and '.join(missing)}; a container given it would see no GPU")
    paths = _Paths(settings)
    nodes = [paths.node(p) for p in (gpu.device_path, *caps)]
    return {"name": name, "containerEdits": {"deviceNodes": nodes}}, ""


def _spec(vendor: str, cls: str, devices: list[Doc], edits: Doc | None = None) -> Spec:
    doc: Doc = {"cdiVersion": "", "kind": f"{vendor}/{cls}",
                "devices": sorted(devices, key=lambda d: str(d["name"]))}
    if edits:
        doc["containerEdits"] = edits
    doc["cdiVersion"] = required_version(doc)
    return Spec(cls, doc)


def gpu_spec(node: Node, facts: DriverFacts, settings: SpecSettings) -> tuple[Spec, list[str]]:
    """Every GPU and every MIG device of the node (what any MIG strategy may hand out)."""
    devices: list[Doc] = []
    notes: list[str] = []
    for gpu in node.gpus:
        devices.append(_gpu_device(gpu, facts, settings))
        for device in gpu.mig_devices:
            doc, note = _mig_device(gpu, device, node, settings)
            if doc is not None:
                devices.append(doc)
            else:
                notes.append(note)
    return _spec(settings.vendor, GPU_CLASS, devices, common_edits(facts, settings)), notes


def feature_specs(facts: DriverFacts, settings: SpecSettings) -> tuple[list[Spec], list[str]]:
    """`gdrcopy|gds|mofed=all` and `imex-channel=<id>` for the features that are on and present."""
    paths = _Paths(settings)
    specs: list[Spec] = []
    notes: list[str] = []
    for cls in FEATURE_CLASSES:
        if cls not in settings.features:
            continue
        nodes = facts.feature_nodes.get(cls, ())
        if not nodes:
            notes.append(f"--{cls}-enabled: no {cls} device nodes under the dev root; "
                         f"{settings.vendor}/{cls}=all is not written nor handed out")
            continue
        edits: Doc = {"deviceNodes": [paths.node(n) for n in nodes]}
        mounts = facts.feature_mounts.get(cls, ())
        if mounts:
            edits["mounts"] = [paths.mount(m) for m in mounts]
        specs.append(_spec(settings.vendor, cls, [{"name": "all", "containerEdits": edits}]))
    channels = []
    for channel in settings.imex_channel_ids:
        path = facts.imex_channels.get(channel)
        if path is None:
            notes.append(f"IMEX channel {channel}: /dev/nvidia-caps-imex-channels/channel{channel} does not exist; "
                         f"{settings.vendor}/{IMEX_CLASS}={channel} is not written nor handed out")
            continue
        channels.append({"name": str(channel), "containerEdits": {"deviceNodes": [paths.node(path)]}})
    if channels:
        specs.append(_spec(settings.vendor, IMEX_CLASS, channels))
    return specs, notes


def build_specs(node: Node, facts: DriverFacts, settings: SpecSettings) -> SpecSet:
    """The gpu spec, then the feature specs that are not empty."""
    gpu, notes = gpu_spec(node, facts, settings)
    features, more = feature_specs(facts, settings)
    # The official plugin passes unknown hook names through silently; a config that works there
    # must load here, so this is a note (a warning), not a config error.
    known = ", ".join((*names.HOOKS, names.ALL_HOOKS))
    unknown = [f"--cdi-disable-hooks: {h!r} names no hook; it disables nothing (known: {known})"
               for h in names.unknown_hooks(sorted(settings.disabled_hooks))]
    return SpecSet((gpu, *features), tuple(unknown + notes + more))


# --------------------------------------------------------------------------------------------
# Versions and names


def _all_edits(doc: Doc) -> list[Doc]:
    edits = [d.get("containerEdits") or {} for d in doc.get("devices") or ()]
    return [doc.get("containerEdits") or {}, *edits]


def required_version(doc: Doc) -> str:
    """The lowest cdiVersion whose features the document uses (the CDI library's own rules)."""
    edits = _all_edits(doc)
    if any(e.get("additionalGids") or e.get("intelRdt") for e in edits):
        return "0.7.0"
    devices = doc.get("devices") or ()
    cls = str(doc.get("kind", "")).partition("/")[2]
    if doc.get("annotations") or any(d.get("annotations") for d in devices) or "." in cls:
        return "0.6.0"
    device_names = [str(d.get("name", "")) for d in devices]
    if any(n.get("hostPath") for e in edits for n in e.get("deviceNodes") or ()) or any(
        name and not name[0].isalpha() for name in device_names  # a name starting with a digit: index names
    ):
        return "0.5.0"
    if any(m.get("type") for e in edits for m in e.get("mounts") or ()):
        return "0.4.0"
    return "0.3.0"


def handed_out(tree: DeviceTree, id_strategy: str) -> set[str]:
    """Every gpu-class device name an Allocate answer for this tree can carry."""
    return {n for resource in tree.values() for n in runtime_ids(resource.devices, id_strategy)}
