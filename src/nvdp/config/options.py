"""The option table and the resolved `Config`.

Every option of the official plugin is a row of `OPTIONS` (flag, aliases, env vars, config-file
key, default, allowed values). The CLI, the env lookup, the file lookup, validation, the README
table and `Config`'s own defaults all read that one table, so adding an option is one row and one
`Config` field. GPU feature discovery (`gpu-feature-discovery`) reads `GFD_OPTIONS`: the plugin's
rows it shares (under its own env names where upstream gives GFD_* ones first) plus its own.
Loading lives in `load.py`, value parsing in `parse.py`, the file schema in `file.py`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from nvdp.config import cdi as cdi_names

# "duration": a Go duration ("60s", "1m30s"), or "infinite"; held as seconds (math.inf).
Kind = Literal["bool", "str", "list", "intlist", "float", "int", "duration"]

# The allowed values of the choice options, as types: `Config` fields carry them, and the table's
# `choices` are read from them, so a value and its type cannot disagree.
MigStrategy = Literal["none", "single", "mixed"]
DeviceListStrategy = Literal["envvar", "volume-mounts", "cdi-annotations", "cdi-cri"]
DeviceIdStrategy = Literal["uuid", "index"]
AllocationPolicy = Literal["distributed", "packed"]
DiscoveryStrategy = Literal["auto", "nvml", "tegra"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
XidClassName = Literal["transient", "fatal", "ignored"]  # a class in the config file's XID policy

LIST_STRATEGIES: tuple[DeviceListStrategy, ...] = get_args(DeviceListStrategy)
CDI_STRATEGIES: frozenset[DeviceListStrategy] = frozenset({"cdi-annotations", "cdi-cri"})


@dataclass(frozen=True)
class Option:
    """One configurable setting and every way to set it."""

    field: str  # Config attribute
    flag: str  # long CLI name without dashes
    kind: Kind
    default: Any
    envs: tuple[str, ...] = ()
    file_key: str | None = None  # dotted path in the config file, e.g. "flags.plugin.passDeviceSpecs"
    aliases: tuple[str, ...] = ()  # more long names; a one-letter alias is a short flag (-o)
    choices: tuple[str, ...] | None = None
    help: str = ""
    # Choices matched in any case (nvdp's own log options); the official ones stay exact, as upstream.
    case_insensitive: bool = False

    @property
    def v1_key(self) -> str:
        """Where the option appears in the printed config: its config-file key, or (command line
        only) `commandLine.<flag in camelCase>`."""
        if self.file_key:
            return self.file_key
        first, *rest = self.flag.split("-")
        return "commandLine." + first + "".join(word.capitalize() for word in rest)


OPTIONS: tuple[Option, ...] = (
    Option("mig_strategy", "mig-strategy", "str", "none", ("MIG_STRATEGY",), "flags.migStrategy",
           choices=get_args(MigStrategy), help="how MIG devices are exposed"),
    Option("fail_on_init_error", "fail-on-init-error", "bool", True, ("FAIL_ON_INIT_ERROR",),
           "flags.failOnInitError", help="exit 1 when NVML cannot load or no GPU is found (else idle)"),
    Option("driver_root", "driver-root", "str", "/", ("NVIDIA_DRIVER_ROOT",), "flags.nvidiaDriverRoot",
           aliases=("nvidia-driver-root",), help="root of the driver installation on the host"),
    Option("dev_root", "dev-root", "str", None, ("NVIDIA_DEV_ROOT",), "flags.nvidiaDevRoot",
           aliases=("nvidia-dev-root",), help="root of /dev on the host (default: the driver root)"),
    Option("pass_device_specs", "pass-device-specs", "bool", False, ("PASS_DEVICE_SPECS",),
           "flags.plugin.passDeviceSpecs", help="return device nodes in Allocate (CPU manager compat)"),
    Option("device_list_strategy", "device-list-strategy", "list", ("envvar",), ("DEVICE_LIST_STRATEGY",),
           "flags.plugin.deviceListStrategy", choices=LIST_STRATEGIES,
           help="how the device list reaches the runtime"),
    Option("device_id_strategy", "device-id-strategy", "str", "uuid", ("DEVICE_ID_STRATEGY",),
           "flags.plugin.deviceIDStrategy", choices=get_args(DeviceIdStrategy), help="IDs passed to the runtime"),
    Option("gdrcopy_enabled", "gdrcopy-enabled", "bool", False, ("GDRCOPY_ENABLED",), "flags.gdrcopyEnabled"),
    Option("gds_enabled", "gds-enabled", "bool", False, ("GDS_ENABLED",), "flags.gdsEnabled"),
    Option("mofed_enabled", "mofed-enabled", "bool", False, ("MOFED_ENABLED",), "flags.mofedEnabled"),
    Option("cdi_annotation_prefix", "cdi-annotation-prefix", "str", "cdi.k8s.io/", ("CDI_ANNOTATION_PREFIX",),
           "flags.plugin.cdiAnnotationPrefix"),
    Option("nvidia_cdi_hook_path", "nvidia-cdi-hook-path", "str", "/usr/bin/nvidia-ctk",
           ("NVIDIA_CDI_HOOK_PATH", "NVIDIA_CTK_PATH"), "flags.plugin.nvidiaCTKPath",
           aliases=("nvidia-ctk-path",)),
    Option("container_driver_root", "driver-root-ctr-path", "str", "/driver-root",
           ("DRIVER_ROOT_CTR_PATH", "CONTAINER_DRIVER_ROOT"), "flags.plugin.containerDriverRoot",
           aliases=("container-driver-root",), help="where the host driver root is mounted in this container"),
    Option("mps_root", "mps-root", "str", "", ("MPS_ROOT",), "flags.mpsRoot"),
    Option("shared_devices_allocation_policy", "shared-devices-allocation-policy", "str", "distributed",
           ("SHARED_DEVICES_ALLOCATION_POLICY",), "flags.plugin.sharedDevicesAllocationPolicy",
           choices=get_args(AllocationPolicy)),
    Option("device_discovery_strategy", "device-discovery-strategy", "str", "auto",
           ("DEVICE_DISCOVERY_STRATEGY",), "flags.deviceDiscoveryStrategy", choices=get_args(DiscoveryStrategy)),
    Option("imex_channel_ids", "imex-channel-ids", "intlist", (), ("IMEX_CHANNEL_IDS",), "imex.channelIDs"),
    Option("imex_required", "imex-required", "bool", False, ("IMEX_REQUIRED",), "imex.required"),
    Option("kubelet_socket", "kubelet-socket", "str", "/var/lib/kubelet/device-plugins/kubelet.sock",
           ("KUBELET_SOCKET",), help="the kubelet's registration socket; empty: do not register"),
    Option("config_file", "config-file", "str", None, ("CONFIG_FILE",), help="config file (schema v1)"),
    Option("cdi_feature_flags", "cdi-feature-flags", "list", (), ("CDI_FEATURE_FLAGS",),
           choices=cdi_names.FEATURE_FLAGS, help="CDI spec generator feature flags (docs/cdi.md)"),
    Option("cdi_disable_hooks", "cdi-disable-hooks", "list", (), ("CDI_DISABLE_HOOKS",),
           help="hooks left out of the CDI spec: 'all' or names such as update-ldcache (docs/cdi.md)"),
    # nvdp's own options.
    Option("metrics_address", "metrics-address", "str", "", ("NVDP_METRICS_ADDRESS",), "flags.nvdp.metricsAddress",
           help="HOST:PORT serving /metrics, /healthz and /readyz (e.g. :9401); empty: off"),
    Option("log_format", "log-format", "str", "text", ("NVDP_LOG_FORMAT",), "flags.nvdp.logFormat",
           choices=get_args(LogFormat), case_insensitive=True,
           help="log lines as key=value text or one JSON object each"),
    # Simulate mode: from the command line or the environment only, never from the config file
    # (FILE_REFUSED), so a ConfigMap cannot switch a node to fake GPUs; docs/simulated-profiles.md.
    Option("simulate", "simulate", "str", None, ("NVDP_SIMULATE",),
           help="run on a simulated node: a built-in profile name or a YAML file (not in the config file)"),
    Option("simulate_on_real_kubelet", "simulate-on-real-kubelet", "bool", False, ("NVDP_SIMULATE_ON_REAL_KUBELET",),
           help="allow --simulate with the default --kubelet-socket: the node's kubelet then advertises fake GPUs"),
    Option("mig_rescan_interval", "mig-rescan-interval", "float", 0.0, ("NVDP_MIG_RESCAN_INTERVAL",),
           "flags.nvdp.migRescanInterval",
           help="seconds between MIG layout rescans (changes are served without a restart); 0: only on SIGHUP"),
    Option("log_level", "log-level", "str", "info", ("NVDP_LOG_LEVEL",), "flags.nvdp.logLevel",
           choices=get_args(LogLevel), case_insensitive=True),
    # Health checks (docs/health.md). The two DP_* env vars are the official plugin's.
    Option("disable_healthchecks", "disable-healthchecks", "list", (), ("DP_DISABLE_HEALTHCHECKS",),
           "flags.nvdp.health.disable", help="'all', 'xids' or XIDs to ignore"),
    Option("enable_healthchecks", "enable-healthchecks", "list", (), ("DP_ENABLE_HEALTHCHECKS",),
           "flags.nvdp.health.enable", help="'all' or XIDs to act on even if ignored"),
    Option("health_quiet_period", "health-quiet-period", "float", 60.0, ("NVDP_HEALTH_QUIET_PERIOD",),
           "flags.nvdp.health.quietPeriod", help="seconds without new events before a transient fault clears"),
    Option("health_probe_interval", "health-probe-interval", "float", 10.0, ("NVDP_HEALTH_PROBE_INTERVAL",),
           "flags.nvdp.health.probeInterval", help="seconds between NVML probes of every GPU; 0: no periodic probe"),
    Option("health_wait_error_threshold", "health-wait-error-threshold", "int", 5,
           ("NVDP_HEALTH_WAIT_ERROR_THRESHOLD",), "flags.nvdp.health.waitErrorThreshold",
           help="consecutive NVML event-wait failures before every device is marked unhealthy"),
    Option("simulate_control", "simulate-control", "str", None, ("NVDP_SIMULATE_CONTROL",),
           help="unix socket for fault injection into the simulated node (not in the config file)"),
    Option("cdi_spec_dir", "cdi-spec-dir", "str", "/var/run/cdi", ("NVDP_CDI_SPEC_DIR",), "flags.nvdp.cdiSpecDir",
           help="folder the CDI specs are written to with a cdi-* list strategy; empty: nvdp writes none"),
    # MPS (docs/sharing.md): the programs, as a path or a command line, and where this container
    # sees the MPS root (the chart mounts mps.root at /mps).
    Option("mps_control", "mps-control", "str", "nvidia-cuda-mps-control", ("NVDP_MPS_CONTROL",),
           "flags.nvdp.mps.control", help="the MPS control program (path or command line)"),
    Option("mps_dir", "mps-dir", "str", "/mps", ("NVDP_MPS_DIR",), "flags.nvdp.mps.dir",
           help="where this container sees the MPS root (pipe and log folders per resource)"),
    Option("nvidia_smi", "nvidia-smi", "str", "nvidia-smi", ("NVDP_NVIDIA_SMI",), "flags.nvdp.mps.nvidiaSmi",
           help="nvidia-smi (path or command line), for the MPS daemon's compute mode"),
    # Health, continued (issue 15; docs/health.md): per-class quiet periods, the driver's
    # recovery action, NVML deadlines, what the cluster sees, GPU hygiene before hand-out.
    Option("health_fatal_quiet_period", "health-fatal-quiet-period", "float", None,
           ("NVDP_HEALTH_FATAL_QUIET_PERIOD",), "flags.nvdp.health.quietPeriods.fatal",
           help="seconds without new events before a fatal XID clears too (after a passing probe); "
                "unset: only a GPU reset clears it"),
    Option("health_recovery_action", "health-recovery-action", "bool", True, ("NVDP_HEALTH_RECOVERY_ACTION",),
           "flags.nvdp.health.recoveryAction",
           help="let the driver's GPU recovery action (where NVML reports it) decide an XID's class"),
    Option("health_nvml_timeout", "health-nvml-timeout", "float", 10.0, ("NVDP_HEALTH_NVML_TIMEOUT",),
           "flags.nvdp.health.nvmlTimeout",
           help="seconds an NVML call on the health path may take before its GPU (or every GPU) is "
                "marked unhealthy with reason nvml-timeout"),
    Option("cluster_health", "cluster-health", "bool", False, ("NVDP_CLUSTER_HEALTH",),
           "flags.nvdp.health.cluster",
           help="post a Kubernetes Event per GPU health change and keep the node condition GPUHealthy "
                "(needs --node-name and RBAC on events and nodes/status)"),
    Option("taint_on_fatal", "taint-on-fatal", "bool", False, ("NVDP_TAINT_ON_FATAL",),
           "flags.nvdp.health.taintOnFatal",
           help="with --cluster-health: taint the node nvidia.com/gpu-fatal-error:NoSchedule while a GPU "
                "has a fatal fault"),
    Option("node_name", "node-name", "str", "", ("NODE_NAME",), "flags.nvdp.nodeName",
           help="this node's name (the downward API's spec.nodeName), for --cluster-health"),
    Option("kubeconfig", "kubeconfig", "str", "", ("KUBECONFIG",),
           help="kubeconfig for --cluster-health; empty: the in-cluster service account"),
    Option("gpu_hygiene", "gpu-hygiene", "bool", False, ("NVDP_GPU_HYGIENE",), "flags.nvdp.health.hygiene",
           help="PreStartContainer refuses an exclusive GPU with compute processes or memory in use"),
    Option("gpu_hygiene_memory_threshold", "gpu-hygiene-memory-threshold", "int", 1024,
           ("NVDP_GPU_HYGIENE_MEMORY_THRESHOLD",), "flags.nvdp.health.hygieneMemoryThreshold",
           help="MiB of GPU memory in use above which --gpu-hygiene calls a GPU dirty"),
)

# Config-file keys refused with an error naming the flag to use instead: simulate mode is never
# switched on from a file (they were accepted before; silently ignoring them would hide that).
FILE_REFUSED: Mapping[str, str] = {
    "flags.nvdp.simulate": "--simulate",
    "flags.nvdp.simulateControl": "--simulate-control",
}

OPTIONS_BY_FIELD: Mapping[str, Option] = {o.field: o for o in OPTIONS}


def _shared(name: str, *envs: str, help: str = "") -> Option:
    """A plugin row GPU feature discovery takes too, with its own env names and help when given."""
    row = OPTIONS_BY_FIELD[name]
    return replace(row, envs=envs or row.envs, help=help or row.help)


GFD_OUTPUT_FILE = "/etc/kubernetes/node-feature-discovery/features.d/gfd"

# GPU feature discovery's options, as upstream's gpu-feature-discovery (upstream-behaviour.md
# section 8): GFD_* env names first, then the plugin's; the config file is the plugin's schema
# (flags.gfd.*, flags.useNodeFeatureAPI).
GFD_OPTIONS: tuple[Option, ...] = (
    _shared("mig_strategy", "GFD_MIG_STRATEGY", "MIG_STRATEGY"),
    _shared("fail_on_init_error", "GFD_FAIL_ON_INIT_ERROR", "FAIL_ON_INIT_ERROR",
            help="exit 1 when NVML cannot start (else label without GPU labels)"),
    Option("oneshot", "oneshot", "bool", False, ("GFD_ONESHOT",), "flags.gfd.oneshot",
           help="label once and exit"),
    Option("no_timestamp", "no-timestamp", "bool", False, ("GFD_NO_TIMESTAMP",), "flags.gfd.noTimestamp",
           help="leave out the nvidia.com/gfd.timestamp label"),
    Option("sleep_interval", "sleep-interval", "duration", 60.0, ("GFD_SLEEP_INTERVAL",), "flags.gfd.sleepInterval",
           help="time between labelling runs (a Go duration such as 60s or 5m, or infinite)"),
    Option("output_file", "output-file", "str", GFD_OUTPUT_FILE, ("GFD_OUTPUT_FILE",), "flags.gfd.outputFile",
           aliases=("output", "o"), help="the NFD local feature file to write; empty or - : stdout"),
    Option("machine_type_file", "machine-type-file", "str", "/sys/class/dmi/id/product_name",
           ("GFD_MACHINE_TYPE_FILE",), "flags.gfd.machineTypeFile", help="file holding the machine type"),
    _shared("config_file", "GFD_CONFIG_FILE", "CONFIG_FILE"),
    Option("use_node_feature_api", "use-node-feature-api", "bool", True,
           ("GFD_USE_NODE_FEATURE_API", "USE_NODE_FEATURE_API"), "flags.useNodeFeatureAPI",
           help="publish the labels as an NFD NodeFeature object instead of writing the file"),
    _shared("device_discovery_strategy"),
    _shared("container_driver_root"),
    _shared("kubeconfig", help="kubeconfig for the NodeFeature API; empty: the in-cluster service account"),
    Option("kube_api_qps", "kube-api-qps", "float", 5.0, ("KUBE_API_QPS",), help="Kubernetes API requests per second"),
    Option("kube_api_burst", "kube-api-burst", "int", 10, ("KUBE_API_BURST",), help="Kubernetes API request burst"),
    Option("namespace", "namespace", "str", "default", ("NAMESPACE",), help="namespace of the NodeFeature object"),
    _shared("node_name"),  # this node's name: the NodeFeature object's, as the plugin's cluster health
    Option("pod_name", "pod-name", "str", "", ("POD_NAME",), help="this pod's name (NodeFeature owner references)"),
    # nvdp's own, as for the plugin.
    _shared("simulate"),
    _shared("log_format"),
    _shared("log_level"),
)

GFD_OPTIONS_BY_FIELD: Mapping[str, Option] = {o.field: o for o in GFD_OPTIONS}
# Every row of either table, by Config field (the defaults of `Config` come from here).
ALL_OPTIONS_BY_FIELD: Mapping[str, Option] = {**GFD_OPTIONS_BY_FIELD, **OPTIONS_BY_FIELD}


SharingStrategy = Literal["none", "time-slicing", "mps"]
# `devices` of a shared resource: "all", a count (the first N devices of the resource) or device
# references (GPU index "0", MIG index "0:1", GPU-/MIG- UUIDs, MIG-GPU-<uuid>/<gi>/<ci>).
DeviceSelection = Literal["all"] | int | tuple[str, ...]


@dataclass(frozen=True)
class XidOverride:
    """One entry of the config file's `flags.nvdp.health.xids` (`file.py` checks it): the class
    of one XID and, optionally, the reason shown for it ("": the built-in one)."""

    xid: int
    cls: XidClassName
    reason: str = ""


@dataclass(frozen=True)
class SharedResource:
    """One entry of `sharing.timeSlicing.resources` or `sharing.mps.resources`, names resolved."""

    name: str
    replicas: int
    rename: str | None = None
    devices: DeviceSelection = "all"
    where: str = ""  # the entry's config-file field, e.g. "sharing.mps.resources.0", for errors
    source_file: str = ""  # the config file it came from, for errors
    rename_by_default: bool = False  # the block's renameByDefault (what the official plugin would serve)

    @property
    def target(self) -> str:
        """The resource the replicas are served under."""
        return self.rename or self.name


TimeSlicingResource = SharedResource  # the name from before MPS


@dataclass(frozen=True)
class Sharing:
    """The active sharing block from the config file (`config/file.py`); no resources: no sharing.
    As the official plugin: with both blocks present, `mps` wins."""

    fail_requests_greater_than_one: bool = False
    resources: tuple[SharedResource, ...] = ()
    mps: bool = False  # the resources come from `sharing.mps`

    @property
    def strategy(self) -> SharingStrategy:
        if not self.resources:
            return "none"
        return "mps" if self.mps else "time-slicing"


def _default(name: str) -> Any:
    """A `Config` field's default: the table's (tuples and scalars only, so no sharing between instances)."""
    return ALL_OPTIONS_BY_FIELD[name].default


@dataclass(frozen=True)
class Config:
    """Every option, resolved and validated (`load.load`); the defaults are the table's."""

    mig_strategy: MigStrategy = _default("mig_strategy")
    fail_on_init_error: bool = _default("fail_on_init_error")
    driver_root: str = _default("driver_root")
    dev_root: str = _default("driver_root")  # unset: the driver root, as upstream
    pass_device_specs: bool = _default("pass_device_specs")
    device_list_strategy: tuple[DeviceListStrategy, ...] = _default("device_list_strategy")
    device_id_strategy: DeviceIdStrategy = _default("device_id_strategy")
    gdrcopy_enabled: bool = _default("gdrcopy_enabled")
    gds_enabled: bool = _default("gds_enabled")
    mofed_enabled: bool = _default("mofed_enabled")
    cdi_annotation_prefix: str = _default("cdi_annotation_prefix")
    nvidia_cdi_hook_path: str = _default("nvidia_cdi_hook_path")
    container_driver_root: str = _default("container_driver_root")
    mps_root: str = _default("mps_root")
    shared_devices_allocation_policy: AllocationPolicy = _default("shared_devices_allocation_policy")
    device_discovery_strategy: DiscoveryStrategy = _default("device_discovery_strategy")
    imex_channel_ids: tuple[int, ...] = _default("imex_channel_ids")
    imex_required: bool = _default("imex_required")
    kubelet_socket: str = _default("kubelet_socket")
    config_file: str | None = _default("config_file")
    cdi_feature_flags: tuple[str, ...] = _default("cdi_feature_flags")
    cdi_disable_hooks: tuple[str, ...] = _default("cdi_disable_hooks")
    metrics_address: str = _default("metrics_address")
    log_format: LogFormat = _default("log_format")
    simulate: str | None = _default("simulate")
    simulate_on_real_kubelet: bool = _default("simulate_on_real_kubelet")
    mig_rescan_interval: float = _default("mig_rescan_interval")
    log_level: LogLevel = _default("log_level")
    disable_healthchecks: tuple[str, ...] = _default("disable_healthchecks")
    enable_healthchecks: tuple[str, ...] = _default("enable_healthchecks")
    health_quiet_period: float = _default("health_quiet_period")
    health_probe_interval: float = _default("health_probe_interval")
    health_wait_error_threshold: int = _default("health_wait_error_threshold")
    simulate_control: str | None = _default("simulate_control")
    health_fatal_quiet_period: float | None = _default("health_fatal_quiet_period")
    health_recovery_action: bool = _default("health_recovery_action")
    health_nvml_timeout: float = _default("health_nvml_timeout")
    cluster_health: bool = _default("cluster_health")
    taint_on_fatal: bool = _default("taint_on_fatal")
    node_name: str = _default("node_name")
    gpu_hygiene: bool = _default("gpu_hygiene")
    gpu_hygiene_memory_threshold: int = _default("gpu_hygiene_memory_threshold")
    cdi_spec_dir: str = _default("cdi_spec_dir")
    mps_control: str = _default("mps_control")
    mps_dir: str = _default("mps_dir")
    nvidia_smi: str = _default("nvidia_smi")
    # GPU feature discovery only (GFD_OPTIONS).
    oneshot: bool = _default("oneshot")
    no_timestamp: bool = _default("no_timestamp")
    sleep_interval: float = _default("sleep_interval")  # seconds; math.inf for "infinite"
    output_file: str = _default("output_file")
    machine_type_file: str = _default("machine_type_file")
    use_node_feature_api: bool = _default("use_node_feature_api")
    kubeconfig: str = _default("kubeconfig")
    kube_api_qps: float = _default("kube_api_qps")
    kube_api_burst: int = _default("kube_api_burst")
    namespace: str = _default("namespace")  # node_name (above) is shared with the plugin's cluster health
    pod_name: str = _default("pod_name")
    sharing: Sharing = field(default_factory=Sharing)
    xid_overrides: tuple[XidOverride, ...] = ()  # flags.nvdp.health.xids of the config file
    # Where each value came from, for error messages: "--mig-strategy", "MIG_STRATEGY" or
    # "flags.migStrategy in /etc/nvdp/config.yaml" (`load.load` fills it; defaults are absent).
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def source(self, name: str) -> str:
        """What the operator used to set a field: its flag, env var or config-file key and file."""
        return self.sources.get(name) or f"--{OPTIONS_BY_FIELD[name].flag}"

    def to_v1(self, table: Sequence[Option] | None = None) -> dict[str, Any]:
        """The config as the official plugin prints it ("Running with config"): schema v1 names
        (`flags.migStrategy`, `flags.plugin.passDeviceSpecs`, ...); nvdp's own settings under
        `flags.nvdp`, command-line-only ones under `commandLine`."""
        doc: dict[str, Any] = {"version": "v1", "flags": {}}
        for opt in OPTIONS if table is None else table:
            node = doc
            *parents, leaf = opt.v1_key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            value = getattr(self, opt.field)
            node[leaf] = list(value) if isinstance(value, tuple) else value
        doc["sharing"] = {"mps" if self.sharing.strategy == "mps" else "timeSlicing": _sharing_v1(self.sharing)}
        if self.xid_overrides:  # the XID policy of the config file (docs/health.md)
            health = doc["flags"].setdefault("nvdp", {}).setdefault("health", {})
            health["xids"] = {o.xid: {"class": o.cls, **({"reason": o.reason} if o.reason else {})}
                              for o in self.xid_overrides}
        return doc

    def to_json(self, table: Sequence[Option] | None = None) -> str:
        """The config as the official plugin prints it (v1 names): a command's options (the
        plugin's by default) and the sharing."""
        return json.dumps(self.to_v1(table), indent=2)


def _sharing_v1(sharing: Sharing) -> dict[str, Any]:
    if not sharing.resources:
        return {}
    resources = [
        {"name": r.name, "replicas": r.replicas, **({"rename": r.rename} if r.rename else {})}
        for r in sharing.resources
    ]
    return {"failRequestsGreaterThanOne": sharing.fail_requests_greater_than_one, "resources": resources}


def changed_settings(old: Config, new: Config) -> list[str]:
    """The v1 names of the settings that differ between two configs (the sharing block as one)."""
    changed = [opt.v1_key for opt in OPTIONS if getattr(old, opt.field) != getattr(new, opt.field)]
    if old.sharing != new.sharing:
        mps = "mps" in (old.sharing.strategy, new.sharing.strategy)
        changed.append("sharing.mps" if mps else "sharing.timeSlicing")
    return sorted(changed)


def flag_names(opt: Option) -> list[str]:
    """The option's command-line names: `--name` for each long name, `-x` for a one-letter alias."""
    return [f"--{n}" if len(n) > 1 else f"-{n}" for n in (opt.flag, *opt.aliases)]


def format_duration(seconds: float) -> str:
    """A duration as the docs and logs show it: "60s", "1.5s" or "infinite"."""
    return "infinite" if math.isinf(seconds) else f"{seconds:g}s"


def options_markdown(table: Sequence[Option] = OPTIONS) -> str:
    """The flag / env var / config-file table for the README (a test keeps the README in sync);
    `GFD_OPTIONS` gives docs/labels.md's."""
    rows = ["| Flag (aliases) | Env var(s) | Config-file key | Default | Allowed |", "|---|---|---|---|---|"]
    for opt in table:
        flags = ", ".join(f"`{n}`" for n in flag_names(opt))
        envs = ", ".join(f"`{e}`" for e in opt.envs) or "—"
        key = f"`{opt.file_key}`" if opt.file_key else "—"
        default = ",".join(str(d) for d in opt.default) if isinstance(opt.default, tuple) else opt.default
        shown = "unset" if default is None else (f"`{default}`" if default != "" else '`""`')
        if isinstance(opt.default, bool):
            shown = f"`{str(opt.default).lower()}`"
        if opt.kind == "duration":
            shown = f"`{format_duration(opt.default)}`"
        allowed = ", ".join(opt.choices) if opt.choices else ""
        rows.append(f"| {flags} | {envs} | {key} | {shown} | {allowed} |")
    return "\n".join(rows)
