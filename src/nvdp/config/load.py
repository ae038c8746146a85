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
from nvdp.config.options import OPTIONS, Config, Option, Sharing
from nvdp.config.parse import file_value, health_items, lookup, parse_text
from nvdp.errors import ConfigError

log = logging.getLogger("nvdp.config")

MAX_CONFIG_BYTES = MAX_INPUT_BYTES


def _flag_name(opt: Option) -> str:
    return f"--{opt.flag}"


def load(
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    read_text: Callable[[str], str] = read_text_file,
    require_mps_root: bool = True,
) -> Config:
    """Resolve the configuration: CLI > env > config file > default, then validate.

    `cli` maps Config field names to what the command line gave: None when not given, a string
    (or a sequence of strings for list options) otherwise. `require_mps_root=False`: the MPS
    control daemon, which works in its own /mps and never names host paths.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        values[opt.field], source = _from_cli_or_env(opt, cli.get(opt.field), environ)
        if source:
            sources[opt.field] = source

    doc: Mapping[str, Any] = {}
    sharing = Sharing()
    config_file = values["config_file"]
    if config_file is not _UNSET and config_file:
        # Imported here: pydantic's import and model building cost start-up time that a plugin
        # run without a config file (the common DaemonSet case) need not pay.
        from nvdp.config.file import read_config_file

        doc, sharing = read_config_file(config_file, read_text, sources["config_file"])

    for opt in OPTIONS:
        if values[opt.field] is _UNSET:
            raw = lookup(doc, opt.file_key) if opt.file_key else None
            if raw is None:
                values[opt.field] = opt.default
            else:
                sources[opt.field] = f"{opt.file_key} in {config_file}"
                values[opt.field] = file_value(opt, raw, sources[opt.field])
        if opt.case_insensitive and isinstance(values[opt.field], str):
            values[opt.field] = values[opt.field].lower()

    if not values["dev_root"]:
        values["dev_root"] = values["driver_root"]
    cfg = Config(**values, sharing=sharing, sources=sources)
    validate(cfg)
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


def validate(cfg: Config) -> None:
    """Reject values outside the allowed sets, naming where the value came from and what is allowed."""
    for opt in OPTIONS:
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
