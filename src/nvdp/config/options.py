"""Configuration: one frozen `Config`, resolved once from CLI > env > config file > default.

Every option of the official plugin is a row of `OPTIONS` (flag, aliases, env vars, config-file
key, default, allowed values). The CLI, the env lookup, the file lookup and the validation all read
that one table, so adding an option is one row and one `Config` field. Nothing else in nvdp reads
`os.environ` or argv.

Parsing follows the official plugin (urfave/cli v2): booleans as Go's `strconv.ParseBool`, an env
var that is set but empty counts as set (false for a boolean), lists split on "," and trimmed, and
for options with two env names the first one present wins.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from nvdp.config import cdi as cdi_names
from nvdp.errors import ConfigError

log = logging.getLogger("nvdp.config")  # stable name: operators filter on it

Kind = Literal["bool", "str", "list", "intlist", "float", "int"]

_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


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


LIST_STRATEGIES = ("envvar", "volume-mounts", "cdi-annotations", "cdi-cri")

OPTIONS: tuple[Option, ...] = (
    Option("mig_strategy", "mig-strategy", "str", "none", ("MIG_STRATEGY",), "flags.migStrategy",
           choices=("none", "single", "mixed"), help="how MIG devices are exposed"),
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
           "flags.plugin.deviceIDStrategy", choices=("uuid", "index"), help="IDs passed to the runtime"),
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
           choices=("distributed", "packed")),
    Option("device_discovery_strategy", "device-discovery-strategy", "str", "auto",
           ("DEVICE_DISCOVERY_STRATEGY",), "flags.deviceDiscoveryStrategy", choices=("auto", "nvml", "tegra")),
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
           choices=("text", "json"), help="log lines as key=value text or one JSON object each"),
    Option("simulate", "simulate", "str", None, ("NVDP_SIMULATE",), "flags.nvdp.simulate",
           help="run on a simulated node: a built-in profile name or a YAML file"),
    Option("mig_rescan_interval", "mig-rescan-interval", "float", 0.0, ("NVDP_MIG_RESCAN_INTERVAL",),
           "flags.nvdp.migRescanInterval",
           help="seconds between MIG layout rescans (changes are served without a restart); 0: only on SIGHUP"),
    Option("log_level", "log-level", "str", "info", ("NVDP_LOG_LEVEL",), "flags.nvdp.logLevel",
           choices=("debug", "info", "warning", "error")),
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
           "flags.nvdp.simulateControl", help="unix socket for fault injection into the simulated node"),
    Option("cdi_spec_dir", "cdi-spec-dir", "str", "/var/run/cdi", ("NVDP_CDI_SPEC_DIR",), "flags.nvdp.cdiSpecDir",
           help="folder the CDI specs are written to with a cdi-* list strategy; empty: nvdp writes none"),
)

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


@dataclass(frozen=True)
class Config:
    mig_strategy: str = "none"
    fail_on_init_error: bool = True
    driver_root: str = "/"
    dev_root: str = "/"
    pass_device_specs: bool = False
    device_list_strategy: tuple[str, ...] = ("envvar",)
    device_id_strategy: str = "uuid"
    gdrcopy_enabled: bool = False
    gds_enabled: bool = False
    mofed_enabled: bool = False
    cdi_annotation_prefix: str = "cdi.k8s.io/"
    nvidia_cdi_hook_path: str = "/usr/bin/nvidia-ctk"
    container_driver_root: str = "/driver-root"
    mps_root: str = ""
    shared_devices_allocation_policy: str = "distributed"
    device_discovery_strategy: str = "auto"
    imex_channel_ids: tuple[int, ...] = ()
    imex_required: bool = False
    kubelet_socket: str = "/var/lib/kubelet/device-plugins/kubelet.sock"
    config_file: str | None = None
    cdi_feature_flags: tuple[str, ...] = ()
    cdi_disable_hooks: tuple[str, ...] = ()
    metrics_address: str = ""
    log_format: str = "text"
    simulate: str | None = None
    mig_rescan_interval: float = 0.0
    log_level: str = "info"
    disable_healthchecks: tuple[str, ...] = ()
    enable_healthchecks: tuple[str, ...] = ()
    health_quiet_period: float = 60.0
    health_probe_interval: float = 10.0
    health_wait_error_threshold: int = 5
    simulate_control: str | None = None
    cdi_spec_dir: str = "/var/run/cdi"
    sharing: Sharing = field(default_factory=Sharing)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Value parsing, Go-style


def parse_go_bool(name: str, raw: str) -> bool:
    if raw in _GO_TRUE:
        return True
    if raw in _GO_FALSE:
        return False
    raise ConfigError(name, f"{raw!r} is not a boolean (use true/false, 1/0, t/f)")


def _split(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _parse_text(opt: Option, name: str, raw: str) -> Any:
    """Parse a value given as text (a CLI argument or an env var)."""
    match opt.kind:
        case "bool":
            return False if raw == "" else parse_go_bool(name, raw)
        case "list":
            return _split(raw)
        case "intlist":
            try:
                return tuple(int(x) for x in _split(raw))
            except ValueError:
                raise ConfigError(name, f"{raw!r} is not a comma-separated list of integers") from None
        case "int":
            try:
                return int(raw)
            except ValueError:
                raise ConfigError(name, f"{raw!r} is not an integer") from None
        case "float":
            try:
                return float(raw)
            except ValueError:
                raise ConfigError(name, f"{raw!r} is not a number") from None
        case _:
            return raw


# ---------------------------------------------------------------------------------------------
# The config file (schema v1)


def _lookup(doc: Mapping[str, Any], dotted: str) -> Any:
    node: Any = doc
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _file_value(opt: Option, raw: Any) -> Any:
    """Check and convert a value read from the config file (typed YAML, not text)."""
    key = f"config file field {opt.file_key}"
    match opt.kind:
        case "bool":
            if not isinstance(raw, bool):
                raise ConfigError(key, f"{raw!r} is not a boolean")
            return raw
        case "list":
            # deviceListStrategy may be one string or a list of strings.
            if isinstance(raw, str):
                return (raw,)
            if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
                return tuple(raw)
            if isinstance(raw, list) and all(isinstance(x, str | int) and not isinstance(x, bool) for x in raw):
                return tuple(str(x) for x in raw)  # e.g. a YAML list of XID numbers
            raise ConfigError(key, f"{raw!r} is not a string or a list of strings")
        case "intlist":
            if isinstance(raw, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
                return tuple(raw)
            raise ConfigError(key, f"{raw!r} is not a list of integers")
        case "int" | "float":
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise ConfigError(key, f"{raw!r} is not a number")
            return raw if opt.kind == "float" else int(raw)
        case _:
            if not isinstance(raw, str):
                raise ConfigError(key, f"{raw!r} is not a string")
            return raw


# ---------------------------------------------------------------------------------------------
# Resolution


def _flag_name(opt: Option) -> str:
    return f"--{opt.flag}"


def load(
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    read_text: Callable[[str], str] = lambda p: open(p, encoding="utf-8").read(),  # noqa: SIM115
) -> Config:
    """Resolve the configuration: CLI > env > config file > default, then validate.

    `cli` maps Config field names to what the command line gave: None when not given, a string
    (or a sequence of strings for list options) otherwise.
    """
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        values[opt.field] = _from_cli_or_env(opt, cli.get(opt.field), environ)

    doc: Mapping[str, Any] = {}
    sharing = Sharing()
    config_file = values["config_file"]
    if config_file is not _UNSET and config_file:
        # Imported here: pydantic's import and model building cost start-up time that a plugin
        # run without a config file (the common DaemonSet case) need not pay.
        from nvdp.config.file import read_config_file

        doc, sharing = read_config_file(config_file, read_text)

    for opt in OPTIONS:
        if values[opt.field] is _UNSET:
            raw = _lookup(doc, opt.file_key) if opt.file_key else None
            values[opt.field] = _file_value(opt, raw) if raw is not None else opt.default

    if not values["dev_root"]:
        values["dev_root"] = values["driver_root"]
    cfg = Config(**values, sharing=sharing)
    validate(cfg)
    return cfg


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


_UNSET: Any = _Unset()


def _from_cli_or_env(opt: Option, given: Any, environ: Mapping[str, str]) -> Any:
    if given is not None:
        if isinstance(given, str):
            return _parse_text(opt, _flag_name(opt), given)
        if isinstance(given, Sequence):  # a repeated list flag; each occurrence may hold commas
            return _parse_text(opt, _flag_name(opt), ",".join(given))
        return given
    for env in opt.envs:
        if env in environ:
            return _parse_text(opt, env, environ[env])
    return _UNSET


def validate(cfg: Config) -> None:
    """Reject values outside the allowed sets, naming the flag and what is allowed."""
    for opt in OPTIONS:
        if opt.choices is None:
            continue
        value = getattr(cfg, opt.field)
        items = value if isinstance(value, tuple) else (value,)
        if not items and opt.default:  # e.g. DEVICE_LIST_STRATEGY="": no device list would reach the runtime
            raise ConfigError(_flag_name(opt), f"empty; give at least one of: {', '.join(opt.choices)}")
        # "invalid strategy" is the official wording for the strategy flags; other choices are values.
        what = "strategy" if opt.flag.endswith("-strategy") else "value"
        for item in items:
            if item not in opt.choices:
                raise ConfigError(_flag_name(opt), f"invalid {what}: {item!r} (allowed: {', '.join(opt.choices)})")
    _validate_health(cfg)
    for hook in cdi_names.unknown_hooks(cfg.cdi_disable_hooks):
        log.warning("--cdi-disable-hooks: %r names no hook; it disables nothing (known: %s)", hook,
                    ", ".join((*cdi_names.HOOKS, cdi_names.ALL_HOOKS)))
    if not (math.isfinite(cfg.mig_rescan_interval) and cfg.mig_rescan_interval >= 0):
        raise ConfigError(
            "--mig-rescan-interval", f"{cfg.mig_rescan_interval} is not a number of seconds >= 0 (0 turns rescans off)"
        )
    if cfg.metrics_address:
        parse_listen_address(cfg.metrics_address)
    if cfg.imex_channel_ids not in ((), (0,)):
        raise ConfigError("--imex-channel-ids", f"channelIDs must be [] or [0]; found {list(cfg.imex_channel_ids)}")


def parse_listen_address(text: str, field: str = "--metrics-address") -> tuple[str, int]:
    """"HOST:PORT" -> (host, port), as Go's net.Listen reads it: an empty host means every
    interface, an IPv6 host is bracketed ("[::1]:9401"), port 0 picks a free port."""
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    valid = (
        bool(sep)
        and port.isdigit()
        and int(port) <= 65535
        and (bracketed or ":" not in host)  # an IPv6 host needs brackets
        and not any(c.isspace() or c in "[]/" for c in host)
    )
    if not valid:
        raise ConfigError(field, f"{text!r} is not HOST:PORT (e.g. :9401, 0.0.0.0:9401, [::1]:9401)")
    return host, int(port)


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


def _validate_health(cfg: Config) -> None:
    from nvdp.core.health import check_switches

    try:
        check_switches(cfg.disable_healthchecks, cfg.enable_healthchecks)
    except ValueError as exc:
        env, _, message = str(exc).partition(": ")
        flag = "--disable-healthchecks" if env.startswith("DP_DISABLE") else "--enable-healthchecks"
        raise ConfigError(f"{flag} ({env})", message) from None
    if not (math.isfinite(cfg.health_quiet_period) and cfg.health_quiet_period >= 0):
        raise ConfigError("--health-quiet-period", f"{cfg.health_quiet_period} is not a number of seconds >= 0")
    if not (math.isfinite(cfg.health_probe_interval) and cfg.health_probe_interval >= 0):
        raise ConfigError(
            "--health-probe-interval", f"{cfg.health_probe_interval} is not a number of seconds >= 0 (0 disables)"
        )
    if cfg.health_wait_error_threshold < 1:
        raise ConfigError("--health-wait-error-threshold", f"{cfg.health_wait_error_threshold} must be at least 1")
    if cfg.simulate_control and not cfg.simulate:
        raise ConfigError("--simulate-control", "fault injection needs a simulated node (--simulate)")
