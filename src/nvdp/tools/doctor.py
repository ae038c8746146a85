"""`nvdp doctor`: check a node the way a support engineer would, and say what to do.

Every check reads files under a `Layout` (driver root, dev root, /proc, /sys, /etc, /run and the
kubelet socket), so tests build whole nodes in temporary folders. GPU facts come from the same
backend the plugin would use: real NVML, or the simulated node with `--simulate`, where the
driver-file checks are skipped. Checks never change the node (the kubelet-folder check creates and
removes one empty file).

A FAIL means something blocks the plugin or every GPU pod; WARN means something works but is
fragile or will surprise; SKIP means the check does not apply. docs/operations.md lists every
check; a test keeps that list and `CHECKS` in step.
"""

from __future__ import annotations

import asyncio
import enum
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nvdp.backends.base import GpuBackend
from nvdp.backends.nvml.library import LIBRARY, LIBRARY_DIRS
from nvdp.config.options import Config
from nvdp.core import mig
from nvdp.core.container import CDI_STRATEGIES
from nvdp.core.devices import DeviceTree, GpuInfo, Node
from nvdp.core.resources import plan_tree
from nvdp.core.topology import bus_key
from nvdp.errors import DiscoveryError, NvmlUnavailable
from nvdp.kubelet.registration import kubelet_answers
from nvdp.tools.nodefacts import (
    inotify_in_use,
    kernel_gpus,
    kernel_module_version,
    library_version,
    pci_gpus,
    read_text,
    running_processes,
)
from nvdp.tools.runtimes import RuntimeConfig, read_all

CLOCK_FLOOR = datetime(2025, 1, 1, tzinfo=UTC)  # a clock before this has certainly not been set
KUBELET_TIMEOUT_S = 2.0
# Process names under /proc -> the runtime the kubelet talks to, most specific first (k3s, RKE2
# and k0s run a process named containerd too; dockerd runs on containerd).
RUNTIME_PROCESSES = {
    "k3s-server": "containerd (k3s)", "k3s-agent": "containerd (k3s)", "k3s": "containerd (k3s)",
    "rke2": "containerd (rke2)", "k0s": "containerd (k0s)", "cri-dockerd": "docker",
    "containerd": "containerd", "crio": "cri-o",
}
_K3S = ("{0} adds the nvidia runtime by itself when nvidia-container-runtime is installed; make it the default "
        "with `{0} server|agent --default-runtime=nvidia` and restart {0}")
CONFIGURE = {
    "containerd": "nvidia-ctk runtime configure --runtime=containerd --set-as-default && systemctl restart containerd",
    "containerd (k0s)": "nvidia-ctk runtime configure --runtime=containerd --set-as-default "
                        "--config=/etc/k0s/containerd.d/nvidia.toml && systemctl restart k0sworker",
    "containerd (k3s)": _K3S.format("k3s"),
    "containerd (rke2)": _K3S.format("rke2"),
    "cri-o": "nvidia-ctk runtime configure --runtime=crio --set-as-default && systemctl restart crio",
    "docker": "nvidia-ctk runtime configure --runtime=docker --set-as-default && systemctl restart docker",
}


class Status(enum.StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Verdict:
    """What one check found; `fix` says what to do (for WARN and FAIL)."""

    status: Status
    summary: str
    details: tuple[str, ...] = ()
    fix: str = ""


@dataclass(frozen=True)
class Result(Verdict):
    """A verdict under the check's name (the names are in `CHECKS`)."""

    name: str = ""


@dataclass(frozen=True)
class Layout:
    """Where the node's files are. Defaults are a real node; tests point them into a tmp folder."""

    driver_root: Path = Path("/")
    dev_root: Path = Path("/")
    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    etc: Path = Path("/etc")
    run: Path = Path("/run")
    var: Path = Path("/var")
    kubelet_socket: str = "/var/lib/kubelet/device-plugins/kubelet.sock"

    @classmethod
    def from_config(cls, cfg: Config, **roots: Path) -> Layout:
        # In the plugin's container the host driver root is mounted at the container driver
        # root; on the host itself that folder does not exist and the driver root is used.
        container_root = Path(cfg.container_driver_root)
        driver_root = container_root if container_root.is_dir() else Path(cfg.driver_root)
        return cls(driver_root=driver_root, dev_root=Path(cfg.dev_root), kubelet_socket=cfg.kubelet_socket, **roots)


@dataclass
class Discovery:
    """What the backend found (or why it could not)."""

    node: Node | None = None
    tree: DeviceTree | None = None
    problems: tuple[mig.Problem, ...] = ()  # what the plugin would log about the MIG layout
    error: DiscoveryError | None = None
    tree_error: DiscoveryError | None = None  # the plugin would not start with this node and config
    backend: str = ""


def discover(open_backend: Callable[[], GpuBackend], cfg: Config) -> Discovery:
    found = Discovery()
    try:
        backend = open_backend()
    except DiscoveryError as exc:
        found.error = exc
        return found
    try:
        found.backend = backend.name
        found.node = backend.discover()
    except DiscoveryError as exc:
        found.error = exc
        return found
    finally:
        backend.close()
    try:
        plan = plan_tree(found.node, cfg)
        found.tree, found.problems = plan.tree, plan.problems
    except DiscoveryError as exc:
        found.tree_error = exc
    return found


def _gpu_line(g: GpuInfo) -> str:
    mig = ", MIG on" if g.mig_enabled else ""
    return f"GPU {g.index}: {g.name} {g.uuid} at {g.pci_bus_id}{mig}"


# --------------------------------------------------------------------------------------------
# The checks


@dataclass
class Doctor:
    """Runs every check in order. Seams: the backend factory, the clock and the user ID."""

    cfg: Config
    layout: Layout
    open_backend: Callable[[], GpuBackend]
    simulated: bool = False
    now: Callable[[], float] = time.time
    uid: int = field(default_factory=os.geteuid)
    found: Discovery = field(default_factory=Discovery)

    async def run(self) -> list[Result]:
        self.found = await asyncio.to_thread(discover, self.open_backend, self.cfg)
        results = []
        for name, check in CHECKS:
            outcome = check(self)
            verdict = outcome if isinstance(outcome, Verdict) else await outcome
            results.append(Result(verdict.status, verdict.summary, verdict.details, verdict.fix, name=name))
        return results

    @property
    def node(self) -> Node | None:
        return self.found.node

    def _simulated(self) -> Verdict:
        return Verdict(Status.SKIP, f"simulated node ({self.cfg.simulate}): no driver files to check")

    # --- the driver -----------------------------------------------------------------------------

    def kernel_driver(self) -> Verdict:
        if self.simulated:
            return self._simulated()
        version = kernel_module_version(self.layout.proc)
        where = self.layout.proc / "driver/nvidia/version"
        if version is None:
            return Verdict(Status.FAIL, f"the NVIDIA kernel module is not loaded ({where} is missing)",
                          fix="install the NVIDIA driver and load it (modprobe nvidia); with the GPU Operator, "
                          "check its driver pod")
        library = self.node.driver_version if self.node else ""
        if not library:  # NVML refuses to start on a mismatch: read the version off the file name
            path = self._library_path()
            library = library_version(path) if path else ""
        if version and library and version != library:
            return Verdict(Status.FAIL, f"driver/library version mismatch: kernel module {version}, "
                          f"NVML library {library}",
                          fix="the driver was upgraded without reloading the module: reboot the node "
                          "(or unload and reload the nvidia modules)")
        return Verdict(Status.PASS, f"NVIDIA kernel module {version or '(unknown version)'} is loaded")

    def _library_path(self) -> Path | None:
        """Where the plugin finds libnvidia-ml.so.1 under the driver root (its search order)."""
        tried = (self.layout.driver_root / d / LIBRARY for d in LIBRARY_DIRS)
        return next((p for p in tried if p.exists()), None)

    def nvml_library(self) -> Verdict:
        if self.simulated:
            return self._simulated()
        root = self.layout.driver_root
        details = tuple(f"tried {root / d / LIBRARY}" for d in LIBRARY_DIRS)
        found = self._library_path()
        if found is not None:
            version = library_version(found)
            return Verdict(Status.PASS, f"found {found}" + (f" (version {version})" if version else ""), details)
        if self.node is not None:
            return Verdict(Status.PASS, f"{LIBRARY} is not under {root}; the loader found it on its default "
                          "search path", details)
        return Verdict(Status.FAIL, f"{LIBRARY} not found under the driver root {root}", details,
                      fix="set --driver-root to where the driver is installed (/run/nvidia/driver with the GPU "
                      "Operator) and mount it at --driver-root-ctr-path, or run the plugin with the nvidia "
                      "runtime so that the library is injected")

    def nvml(self) -> Verdict:
        error = self.found.error
        if error is not None:
            searched = error.searched if isinstance(error, NvmlUnavailable) else ()
            return Verdict(Status.FAIL, str(error).split("; searched:")[0],
                          tuple(f"searched {p}" for p in searched),
                          fix="the plugin must see the driver: make nvidia the container runtime's default "
                          "(or give the DaemonSet runtimeClassName: nvidia), or mount the driver root; on a "
                          "node without GPUs, set --fail-on-init-error=false")
        assert self.node is not None
        if self.simulated:
            return Verdict(Status.PASS, f"simulated node {self.cfg.simulate}: driver {self.node.driver_version}")
        return Verdict(Status.PASS, f"NVML initialised: driver {self.node.driver_version}")

    def gpus(self) -> Verdict:
        if self.node is None:
            return Verdict(Status.SKIP, "no discovery (see nvml)")
        details = tuple(_gpu_line(g) for g in self.node.gpus)
        if not self.node.gpus:
            return Verdict(Status.FAIL, "NVML sees no GPU", details,
                          fix="check nvidia-smi on the host; in a container NVIDIA_VISIBLE_DEVICES must be 'all'")
        seen = {bus_key(g.pci_bus_id) for g in self.node.gpus}
        hidden = set() if self.simulated else (pci_gpus(self.layout.sys) | kernel_gpus(self.layout.proc)) - seen
        if hidden:
            return Verdict(Status.WARN, f"{plural(len(hidden), 'NVIDIA GPU')} on the PCI bus "
                          f"{'is' if len(hidden) == 1 else 'are'} not visible to NVML: "
                          f"{', '.join(sorted(hidden))}", details,
                          fix="look for XID 79 (fallen off the bus) in the kernel log and run nvidia-smi; in a "
                          "container, NVIDIA_VISIBLE_DEVICES must be 'all'")
        return Verdict(Status.PASS, f"{plural(len(self.node.gpus), 'GPU')}: "
                      f"{', '.join(sorted({g.name for g in self.node.gpus}))}", details)

    def device_nodes(self) -> Verdict:
        if self.simulated:
            return self._simulated()
        dev = self.layout.dev_root / "dev"
        if self.node is not None:
            required = ["nvidiactl", *(f"nvidia{g.minor}" for g in self.node.gpus)]
        else:
            required = ["nvidiactl", *sorted(p.name for p in dev.glob("nvidia[0-9]*"))]
        missing = [n for n in required if not (dev / n).exists()]
        optional = ["nvidia-uvm", "nvidia-uvm-tools"]
        if self.node is not None and any(g.mig_enabled for g in self.node.gpus):
            optional.append("nvidia-caps")
        absent = [n for n in optional if not (dev / n).exists()]
        denied = [n for n in required if (dev / n).exists() and not os.access(dev / n, os.R_OK | os.W_OK)]
        details = [f"missing {dev / n}" for n in missing + absent] + [f"no read/write access to {dev / n}"
                                                                      for n in denied]
        others = f"; {len(absent)} optional missing" if absent else ""
        others += f"; {len(denied)} not accessible by uid {self.uid}" if denied else ""
        if missing:  # the summary counts every line below it
            return Verdict(Status.FAIL, f"{plural(len(missing), 'required device node')} missing under {dev}"
                           f"{others}", tuple(details),
                          fix="create them (nvidia-modprobe, or nvidia-ctk system create-dev-char-symlinks "
                          "--create-all) or set --dev-root to the root whose /dev has them")
        if absent or denied:
            return Verdict(Status.WARN, f"{plural(len(absent), 'optional device node')} missing, "
                          f"{len(denied)} not accessible by uid {self.uid}", tuple(details),
                          fix="nvidia-uvm is created on first CUDA use (nvidia-modprobe -u -c=0); MIG needs "
                          "/dev/nvidia-caps (nvidia-ctk system create-device-nodes --control-devices)")
        return Verdict(Status.PASS, f"{plural(len(required), 'device node')} present under {dev}")

    def mig(self) -> Verdict:
        """The plugin's own MIG planning (resources.plan_tree) on the discovered node."""
        if self.node is None:
            return Verdict(Status.SKIP, "no discovery (see nvml)")
        strategy = self.cfg.mig_strategy
        on = [g for g in self.node.gpus if g.mig_enabled]
        details = (f"layout: {mig.describe_layout(self.node.gpus)}",
                   *(p.message for p in self.found.problems))
        if self.found.tree_error is not None:
            return Verdict(Status.FAIL, f"the plugin would not start: {self.found.tree_error}", details,
                           fix="use --mig-strategy=mixed, or give every GPU the same MIG mode and one profile "
                           "(docs/mig.md)")
        if strategy == "none" and on:
            return Verdict(Status.WARN, f"MIG is on for {plural(len(on), 'GPU')} but --mig-strategy=none: they are "
                           "advertised as whole GPUs and pods on them see no device", details,
                           fix="use --mig-strategy=single or mixed, or turn MIG off (nvidia-smi -mig 0)")
        if self.found.problems:
            return Verdict(Status.WARN, f"{plural(len(self.found.problems), 'MIG problem')}: "
                           f"{self.found.problems[0].message}", details,
                           fix="recreate the MIG devices (nvidia-smi mig, or the MIG manager); docs/mig.md")
        if not on:
            return Verdict(Status.PASS, f"MIG is off on every GPU (--mig-strategy={strategy})", details)
        return Verdict(Status.PASS, f"--mig-strategy={strategy} serves MIG on {len(on)} of "
                       f"{plural(len(self.node.gpus), 'GPU')}", details)

    # --- the kubelet ------------------------------------------------------------------------------

    def kubelet_folder(self) -> Verdict:
        if not self.layout.kubelet_socket:
            return Verdict(Status.SKIP, "--kubelet-socket is empty: the plugin does not register")
        folder = Path(self.layout.kubelet_socket).parent
        if not folder.is_dir():
            return Verdict(Status.FAIL, f"{folder} does not exist",
                          fix="mount the kubelet's device-plugins folder (/var/lib/kubelet/device-plugins) into "
                          "the plugin, or point --kubelet-socket at the kubelet's folder (kubelet --root-dir)")
        probe = folder / f".nvdp-doctor-{os.getpid()}"
        try:
            probe.touch()
            probe.unlink()
        except OSError as exc:
            return Verdict(Status.FAIL, f"cannot create sockets in {folder}: {exc.strerror} (uid {self.uid})",
                          fix="run the plugin as root (the kubelet's folder is root's) and mount it read-write")
        return Verdict(Status.PASS, f"{folder} exists and is writable")

    async def kubelet_socket(self) -> Verdict:
        path = self.layout.kubelet_socket
        if not path:
            return Verdict(Status.SKIP, "--kubelet-socket is empty: the plugin does not register")
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return Verdict(Status.FAIL, f"{path} does not exist: the kubelet is not running or uses another "
                          "root directory", fix="start the kubelet, or point --kubelet-socket at its folder")
        if not stat.S_ISSOCK(mode):
            return Verdict(Status.FAIL, f"{path} is not a socket",
                          fix="something else created this file: remove it and restart the kubelet")
        if not await kubelet_answers(path, KUBELET_TIMEOUT_S):
            return Verdict(Status.FAIL, f"{path} does not answer within {KUBELET_TIMEOUT_S:g} s",
                          fix="check that the kubelet runs (systemctl status kubelet) and its log")
        return Verdict(Status.PASS, f"the kubelet answers on {path}")

    # --- the container runtime ------------------------------------------------------------------

    def container_runtime(self) -> Verdict:
        configs = read_all(self.layout.etc, self.layout.var)
        running = running_processes(self.layout.proc)
        used = next((rt for proc, rt in RUNTIME_PROCESSES.items() if proc in running), None)
        if used is not None and used not in configs:
            return Verdict(Status.WARN, f"{used} is running but its configuration was not found under "
                          f"{self.layout.etc} or {self.layout.var}", fix="pass the node's folders with --etc-root "
                          "and --var-root")
        judged = [configs[used]] if used is not None else list(configs.values())
        if not judged:
            return Verdict(Status.WARN, f"no containerd, CRI-O or docker configuration under {self.layout.etc} "
                          f"or {self.layout.var}", fix="run doctor on the node, or pass the node's folders with "
                          "--etc-root and --var-root")
        verdicts = [self._judge(c) for c in judged]
        order = [Status.PASS, Status.WARN, Status.FAIL]
        best = min(verdicts, key=lambda v: order.index(v.status))
        details = tuple(f"{v.summary}" for v in verdicts if v is not best)
        if used is None and len(verdicts) > 1:
            details += ("no runtime process visible under /proc: judged by the best configuration found",)
        return Verdict(best.status, best.summary, best.details + details, best.fix)

    def _judge(self, c: RuntimeConfig) -> Verdict:
        files = tuple(f"read {f}" for f in c.files)
        uses_cdi = bool(set(self.cfg.device_list_strategy) & CDI_STRATEGIES)
        if c.error:
            return Verdict(Status.FAIL, f"{c.runtime}: cannot parse {c.error}", files,
                          fix=f"correct the file; {c.runtime} itself fails to start with it")
        if c.nvidia_default:
            return Verdict(Status.PASS, f"{c.runtime}: the default runtime is '{c.default}' "
                          f"({c.runtimes[c.default]})", files)
        if c.hooks:
            return Verdict(Status.PASS, f"{c.runtime}: the NVIDIA OCI hook is installed ({c.hooks[0]})", files)
        if c.cdi and uses_cdi:
            return Verdict(Status.PASS, f"{c.runtime}: CDI is enabled and the plugin returns CDI names "
                          f"(--device-list-strategy={','.join(self.cfg.device_list_strategy)})", files)
        if c.nvidia_runtimes:
            return Verdict(Status.WARN, f"{c.runtime}: the nvidia runtime '{c.nvidia_runtimes[0]}' is "
                          f"configured but the default is '{c.default}': pods and the plugin itself need "
                          "runtimeClassName: nvidia", files,
                          fix=f"{CONFIGURE[c.runtime]}, or create a RuntimeClass with handler "
                          f"{c.nvidia_runtimes[0]} and set runtimeClassName in the DaemonSet and the pods")
        if c.cdi:
            return Verdict(Status.WARN, f"{c.runtime}: no nvidia runtime, but CDI is enabled: use "
                          "--device-list-strategy=cdi-cri", files, fix=CONFIGURE[c.runtime])
        return Verdict(Status.FAIL, f"{c.runtime}: not configured for NVIDIA (no nvidia runtime, CDI off)",
                      files, fix=CONFIGURE[c.runtime])

    def cdi_specs(self) -> Verdict:
        """The gpu CDI spec defines every name the plugin hands out (tools/cdi.py)."""
        from nvdp.backends.driver_root import Roots
        from nvdp.tools.cdi import doctor_check

        roots = Roots(scan_driver=str(self.layout.driver_root), scan_dev=str(self.layout.dev_root),
                      host_driver=self.cfg.driver_root, host_dev=self.cfg.dev_root, sys=str(self.layout.sys))
        found = doctor_check(self.cfg, self.node, self.found.tree, roots, self.layout.run, self.layout.etc,
                             self.simulated)
        return Verdict(Status(found.status), found.summary, found.details, found.fix)

    # --- the host ---------------------------------------------------------------------------------

    def inotify(self) -> Verdict:
        limit = read_text(self.layout.proc / "sys/fs/inotify/max_user_instances")
        if limit is None or not limit.strip().isdigit():
            return Verdict(Status.SKIP, "cannot read fs.inotify.max_user_instances")
        maximum = int(limit)
        used = inotify_in_use(self.layout.proc, self.uid)
        summary = f"{used} of {maximum} inotify instances in use by uid {self.uid}"
        fix = "raise the limit: sysctl -w fs.inotify.max_user_instances=8192 (persist it in /etc/sysctl.d)"
        if used >= maximum:
            return Verdict(Status.FAIL, f"{summary}: the plugin cannot watch the kubelet folder", fix=fix)
        if used >= maximum * 0.9:
            return Verdict(Status.WARN, f"{summary}: close to the limit", fix=fix)
        return Verdict(Status.PASS, summary)

    def clock(self) -> Verdict:
        now = datetime.fromtimestamp(self.now(), UTC)
        if now < CLOCK_FLOOR:
            return Verdict(Status.WARN, f"the system clock reads {now:%Y-%m-%d %H:%M} UTC, before "
                          f"{CLOCK_FLOOR:%Y-%m-%d}: log times are wrong and TLS (image pulls) fails",
                          fix="enable time synchronisation (chrony or systemd-timesyncd)")
        return Verdict(Status.PASS, f"the system clock reads {now:%Y-%m-%d %H:%M} UTC")


# A check reads the node and returns its verdict, directly or (when it must wait, e.g. on the
# kubelet socket) as a coroutine.
Check = Callable[["Doctor"], Verdict | Awaitable[Verdict]]

CHECKS: tuple[tuple[str, Check], ...] = (
    ("kernel-driver", Doctor.kernel_driver),
    ("nvml-library", Doctor.nvml_library),
    ("nvml", Doctor.nvml),
    ("gpus", Doctor.gpus),
    ("device-nodes", Doctor.device_nodes),
    ("mig", Doctor.mig),
    ("kubelet-folder", Doctor.kubelet_folder),
    ("kubelet-socket", Doctor.kubelet_socket),
    ("container-runtime", Doctor.container_runtime),
    ("cdi-specs", Doctor.cdi_specs),
    ("inotify", Doctor.inotify),
    ("clock", Doctor.clock),
)


def plural(count: int, noun: str) -> str:
    """`1 GPU`, `2 GPUs`, `0 warnings`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def blocking(results: Sequence[Result]) -> bool:
    return any(r.status is Status.FAIL for r in results)


def render(results: Sequence[Result]) -> Iterator[str]:
    width = max(len(r.name) for r in results)
    for r in results:
        yield f"{r.status.value.upper():4}  {r.name:<{width}}  {r.summary}"
        for detail in r.details:
            yield f"{'':4}  {'':<{width}}  - {detail}"
        if r.fix and r.status in (Status.FAIL, Status.WARN):
            yield f"{'':4}  {'':<{width}}  fix: {r.fix}"
    counts = {s: sum(r.status is s for r in results) for s in Status}
    verdict = "something blocks the plugin" if blocking(results) else "nothing blocks the plugin"
    yield (f"{counts[Status.PASS]} passed, {plural(counts[Status.WARN], 'warning')}, {counts[Status.FAIL]} failed, "
           f"{counts[Status.SKIP]} skipped: {verdict}")


def to_json(results: Sequence[Result]) -> dict[str, Any]:
    return {
        "ok": not blocking(results),
        "checks": [
            {"name": r.name, "status": r.status.value, "summary": r.summary, "details": list(r.details), "fix": r.fix}
            for r in results
        ],
    }
