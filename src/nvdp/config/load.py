"""Resolving the configuration once: CLI > env > config file > default, then validation.

Nothing else in nvdp reads `os.environ` or argv: the CLI hands both in. For options with two env
names the first one present wins, as in the official plugin. Every value remembers where it came
from (`Config.sources`), so an error names what the operator wrote: the flag, the env var, or the
config-file key and file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nvdp.config.inputs import MAX_INPUT_BYTES, read_text_file
from nvdp.config.options import FILE_REFUSED, OPTIONS, Config, Option, Sharing, XidOverride, flag_names
from nvdp.config.parse import file_value, health_items, lookup, parse_text
from nvdp.errors import ConfigError

log = logging.getLogger("nvdp.config")

MAX_CONFIG_BYTES = MAX_INPUT_BYTES


def _flag_name(opt: Option) -> str:
    return flag_names(opt)[0]


def load(
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    read_text: Callable[[str], str] = read_text_file,
    options: Sequence[Option] = OPTIONS,
    require_mps_root: bool = True,
) -> Config:
    """Resolve the configuration: CLI > env > config file > default, then validate.

    `cli` maps Config field names to what the command line gave: None when not given, a string
    (or a sequence of strings for list options) otherwise. `options` is the command's table
    (`GFD_OPTIONS` for GPU feature discovery); fields outside it keep `Config`'s defaults.
    `require_mps_root=False`: the MPS control daemon, which works in its own /mps and never names
    host paths.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in options:
        values[opt.field], source = _from_cli_or_env(opt, cli.get(opt.field), environ)
        if source:
            sources[opt.field] = source

    doc: Mapping[str, Any] = {}
    sharing = Sharing()
    xid_overrides: tuple[XidOverride, ...] = ()
    config_file = values.get("config_file", _UNSET)
    if config_file is not _UNSET and config_file:
        # Imported here: pydantic's import and model building cost start-up time that a plugin
        # run without a config file (the common DaemonSet case) need not pay.
        from nvdp.config.file import read_config_file

        doc, sharing, xid_overrides = read_config_file(config_file, read_text, sources["config_file"])
        for key, flag in FILE_REFUSED.items():
            if lookup(doc, key) is not None:
                raise ConfigError(f"{key} in {config_file}", f"simulate mode is set only on the command line or "
                                  f"in the environment ({flag}), never from the config file")

    for opt in options:
        if values[opt.field] is _UNSET:
            raw = lookup(doc, opt.file_key) if opt.file_key else None
            if raw is None:
                values[opt.field] = opt.default
            else:
                sources[opt.field] = f"{opt.file_key} in {config_file}"
                values[opt.field] = file_value(opt, raw, sources[opt.field])
        if opt.case_insensitive and isinstance(values[opt.field], str):
            values[opt.field] = values[opt.field].lower()

    if "dev_root" in values and not values["dev_root"]:
        values["dev_root"] = values["driver_root"]
    cfg = Config(**values, sharing=sharing, xid_overrides=xid_overrides, sources=sources)
    validate(cfg, options)
    # The plugin's MPS flag rules, for the commands that take its MPS flags (the plugin and the MPS
    # daemon). Upstream GFD checks neither: its MPS errors come from the node (core/labels.py).
    if any(opt.field == "mps_root" for opt in options):
        validate_mps(cfg, require_mps_root)
    return cfg


def validate_mps(cfg: Config, require_mps_root: bool = True) -> None:
    """The official plugin's MPS rules that need no GPU (the rest depend on the node: core/mps.py)."""
    if cfg.sharing.strategy != "mps":
        return
    if cfg.mig_strategy == "mixed":
        raise ConfigError("--mig-strategy", "using --mig-strategy=mixed is not supported with MPS")
    if require_mps_root and not cfg.mps_root:
        raise ConfigError("--mps-root", "using MPS requires --mps-root to be specified")


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


_UNSET: Any = _Unset()


def _from_cli_or_env(opt: Option, given: Any, environ: Mapping[str, str]) -> tuple[Any, str]:
    """The value from the command line or the env, and which of them gave it ("" for neither)."""
    if given is not None:
        flag = _flag_name(opt)
        if isinstance(given, str):
            return parse_text(opt, flag, given), flag
        if isinstance(given, Sequence):  # a repeated list flag; each occurrence may hold commas
            return parse_text(opt, flag, ",".join(given)), flag
        return given, flag
    for env in opt.envs:
        if env in environ:
            return parse_text(opt, env, environ[env]), env
    return _UNSET, ""


def validate(cfg: Config, options: Sequence[Option] = OPTIONS) -> None:
    """Reject values outside the allowed sets, naming where the value came from and what is allowed."""
    for opt in options:
        if opt.choices is None:
            continue
        value = getattr(cfg, opt.field)
        items = value if isinstance(value, tuple) else (value,)
        if not items and opt.default:  # e.g. DEVICE_LIST_STRATEGY="": no device list would reach the runtime
            raise ConfigError(cfg.source(opt.field), f"empty; give at least one of: {', '.join(opt.choices)}")
        # "invalid strategy" is the official wording for the strategy flags; other choices are values.
        what = "strategy" if opt.flag.endswith("-strategy") else "value"
        for item in items:
            if item not in opt.choices:
                raise ConfigError(cfg.source(opt.field),
                                  f"invalid {what}: {item!r} (allowed: {', '.join(opt.choices)})")
    _validate_health(cfg)
    if not (math.isfinite(cfg.mig_rescan_interval) and cfg.mig_rescan_interval >= 0):
        raise ConfigError(cfg.source("mig_rescan_interval"),
                          f"{cfg.mig_rescan_interval} is not a number of seconds >= 0 (0 turns rescans off)")
    if cfg.metrics_address:
        parse_listen_address(cfg.metrics_address, cfg.source("metrics_address"))
    if not cfg.sleep_interval > 0:  # 0 or less would relabel in a busy loop
        raise ConfigError(cfg.source("sleep_interval"),
                          f"{cfg.sleep_interval:g}s: give a positive duration (e.g. 60s) or infinite")
    if cfg.imex_channel_ids not in ((), (0,)):
        raise ConfigError(cfg.source("imex_channel_ids"),
                          f"channelIDs must be [] or [0]; found {list(cfg.imex_channel_ids)}")


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


# The kubelet gives PreStartContainer 30 s; the hygiene check's NVML calls run under this deadline.
MAX_NVML_TIMEOUT_S = 20.0


def _validate_health(cfg: Config) -> None:
    for name in ("disable_healthchecks", "enable_healthchecks"):
        for entry in health_items(getattr(cfg, name)).malformed:
            # The official plugin's words: it ignores the entry and starts, so we do too.
            log.warning("Ignoring malformed Xid value", extra={"source": cfg.source(name), "value": entry})
    for name in ("health_quiet_period", "health_probe_interval"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            off = " (0 disables)" if name == "health_probe_interval" else ""
            raise ConfigError(cfg.source(name), f"{value} is not a number of seconds >= 0{off}")
    if cfg.health_wait_error_threshold < 1:
        raise ConfigError(cfg.source("health_wait_error_threshold"),
                          f"{cfg.health_wait_error_threshold} must be at least 1")
    if cfg.simulate_control and not cfg.simulate:
        raise ConfigError(cfg.source("simulate_control"), "fault injection needs a simulated node (--simulate)")
    fatal = cfg.health_fatal_quiet_period
    if fatal is not None and not (math.isfinite(fatal) and fatal >= 0):
        raise ConfigError(cfg.source("health_fatal_quiet_period"),
                          f"{fatal} is not a number of seconds >= 0 (unset: never)")
    if not (math.isfinite(cfg.health_nvml_timeout) and 0 < cfg.health_nvml_timeout <= MAX_NVML_TIMEOUT_S):
        raise ConfigError(
            cfg.source("health_nvml_timeout"),
            f"{cfg.health_nvml_timeout} is not a number of seconds > 0 and <= {MAX_NVML_TIMEOUT_S:g} "
            "(PreStartContainer must answer within the kubelet's 30 s)",
        )
    if cfg.cluster_health and not cfg.node_name:
        raise ConfigError(cfg.source("cluster_health"),
                          "needs --node-name (NODE_NAME, from the downward API's spec.nodeName)")
    if cfg.taint_on_fatal and not cfg.cluster_health:
        raise ConfigError(cfg.source("taint_on_fatal"),
                          "needs --cluster-health (the taint is part of what the cluster sees)")
    if cfg.gpu_hygiene_memory_threshold < 0:
        raise ConfigError(cfg.source("gpu_hygiene_memory_threshold"),
                          f"{cfg.gpu_hygiene_memory_threshold} MiB is negative")
