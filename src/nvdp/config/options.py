"""The option table and the resolved `Config`.

Every option of the official plugin is a row of `OPTIONS` (flag, aliases, env vars, config-file
key, default, allowed values). The CLI, the env lookup, the file lookup, validation, the README
table and `Config`'s own defaults all read that one table, so adding an option is one row and one
`Config` field. Loading lives in `load.py`, value parsing in `parse.py`, the file schema in `file.py`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

Kind = Literal["bool", "str", "list", "intlist", "float", "int"]

# The allowed values of the choice options, as types: `Config` fields carry them, and the table's
# `choices` are read from them, so a value and its type cannot disagree.
MigStrategy = Literal["none", "single", "mixed"]
DeviceListStrategy = Literal["envvar", "volume-mounts", "cdi-annotations", "cdi-cri"]
DeviceIdStrategy = Literal["uuid", "index"]
AllocationPolicy = Literal["distributed", "packed"]
DiscoveryStrategy = Literal["auto", "nvml", "tegra"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]

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
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    help: str = ""


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
    Option("cdi_feature_flags", "cdi-feature-flags", "list", (), ("CDI_FEATURE_FLAGS",)),
    Option("cdi_disable_hooks", "cdi-disable-hooks", "list", (), ("CDI_DISABLE_HOOKS",)),
    # nvdp's own options.
    Option("metrics_address", "metrics-address", "str", "", ("NVDP_METRICS_ADDRESS",), "flags.nvdp.metricsAddress",
           help="HOST:PORT serving /metrics, /healthz and /readyz (e.g. :9401); empty: off"),
    Option("log_format", "log-format", "str", "text", ("NVDP_LOG_FORMAT",), "flags.nvdp.logFormat",
           choices=get_args(LogFormat), help="log lines as key=value text or one JSON object each"),
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
           choices=get_args(LogLevel)),
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
)

# Config-file keys refused with an error naming the flag to use instead: simulate mode is never
# switched on from a file (they were accepted before; silently ignoring them would hide that).
FILE_REFUSED: Mapping[str, str] = {
    "flags.nvdp.simulate": "--simulate",
    "flags.nvdp.simulateControl": "--simulate-control",
}

OPTIONS_BY_FIELD: Mapping[str, Option] = {o.field: o for o in OPTIONS}


@dataclass(frozen=True)
class TimeSlicingResource:
    name: str
    replicas: int
    rename: str | None = None


@dataclass(frozen=True)
class Sharing:
    """Time-slicing from the config file, names already resolved (`configfile.py`); no resources:
    no sharing. A `sharing.mps` block is rejected at load time."""

    fail_requests_greater_than_one: bool = False
    resources: tuple[TimeSlicingResource, ...] = ()


def _default(name: str) -> Any:
    """A `Config` field's default: the table's (tuples and scalars only, so no sharing between instances)."""
    return OPTIONS_BY_FIELD[name].default


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
    sharing: Sharing = field(default_factory=Sharing)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def options_markdown() -> str:
    """The flag / env var / config-file table for the README (a test keeps the README in sync)."""
    rows = ["| Flag (aliases) | Env var(s) | Config-file key | Default | Allowed |", "|---|---|---|---|---|"]
    for opt in OPTIONS:
        flags = ", ".join(f"`--{n}`" for n in (opt.flag, *opt.aliases))
        envs = ", ".join(f"`{e}`" for e in opt.envs) or "—"
        key = f"`{opt.file_key}`" if opt.file_key else "—"
        default = ",".join(str(d) for d in opt.default) if isinstance(opt.default, tuple) else opt.default
        shown = "unset" if default is None else (f"`{default}`" if default != "" else '`""`')
        if isinstance(opt.default, bool):
            shown = f"`{str(opt.default).lower()}`"
        allowed = ", ".join(opt.choices) if opt.choices else ""
        rows.append(f"| {flags} | {envs} | {key} | {shown} | {allowed} |")
    return "\n".join(rows)
