"""Resolving the configuration once: CLI > env > config file > default, then validation.

Nothing else in nvdp reads `os.environ` or argv: the CLI hands both in. For options with two env
names the first one present wins, as in the official plugin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nvdp.config.options import FILE_REFUSED, OPTIONS, Config, Option, Sharing
from nvdp.config.parse import file_value, health_items, lookup, parse_text
from nvdp.errors import ConfigError


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
        for key, flag in FILE_REFUSED.items():
            if lookup(doc, key) is not None:
                raise ConfigError(f"config file field {key}", f"simulate mode is set only on the command line or in "
                                  f"the environment ({flag}), never from the config file")

    for opt in OPTIONS:
        if values[opt.field] is _UNSET:
            raw = lookup(doc, opt.file_key) if opt.file_key else None
            values[opt.field] = file_value(opt, raw) if raw is not None else opt.default

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
            return parse_text(opt, _flag_name(opt), given)
        if isinstance(given, Sequence):  # a repeated list flag; each occurrence may hold commas
            return parse_text(opt, _flag_name(opt), ",".join(given))
        return given
    for env in opt.envs:
        if env in environ:
            return parse_text(opt, env, environ[env])
    return _UNSET


def validate(cfg: Config) -> None:
    """Reject values outside the allowed sets, naming the flag and what is allowed."""
    for opt in OPTIONS:
        if opt.choices is None:
            continue
        value = getattr(cfg, opt.field)
        items = value if isinstance(value, tuple) else (value,)
        if not items:  # e.g. DEVICE_LIST_STRATEGY="": no device list would reach the container runtime
            raise ConfigError(_flag_name(opt), f"empty; give at least one of: {', '.join(opt.choices)}")
        # "invalid strategy" is the official wording for the strategy flags; other choices are values.
        what = "strategy" if opt.flag.endswith("-strategy") else "value"
        for item in items:
            if item not in opt.choices:
                raise ConfigError(_flag_name(opt), f"invalid {what}: {item!r} (allowed: {', '.join(opt.choices)})")
    _validate_health(cfg)
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


def _validate_health(cfg: Config) -> None:
    health_items("disable_healthchecks", cfg.disable_healthchecks)
    health_items("enable_healthchecks", cfg.enable_healthchecks)
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
