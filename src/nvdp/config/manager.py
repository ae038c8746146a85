"""`config-manager` settings: the official config-manager's flags and env vars, then nvdp's own.

Same precedence as the plugin (a flag beats its env var, which beats the default); an env var set
to "" counts as not set, because the official chart sets SIGNAL="" and PROCESS_TO_SIGNAL="" on the
init container (which sends no signal). Validation names the flag and its env var.
"""

from __future__ import annotations

import math
import signal as signals
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast, get_args

from nvdp.config.parse import parse_go_bool, split_list
from nvdp.errors import ConfigError

FallbackStrategy = Literal["named", "single", "empty"]
FALLBACK_STRATEGIES: tuple[str, ...] = get_args(FallbackStrategy)
DEFAULT_LABEL = "nvidia.com/device-plugin.config"
DEFAULT_PROCESS = "nvidia-device-plugin"


@dataclass(frozen=True)
class ManagerOption:
    field: str
    flag: str
    env: str
    kind: Literal["str", "bool", "int", "list", "float"]
    default: object
    help: str


MANAGER_OPTIONS: tuple[ManagerOption, ...] = (
    ManagerOption("oneshot", "oneshot", "ONESHOT", "bool", False, "check and update the config once, then exit"),
    ManagerOption("kubeconfig", "kubeconfig", "KUBECONFIG", "str", "",
                  "path to a kubeconfig file (empty: the in-cluster service account)"),
    ManagerOption("node_name", "node-name", "NODE_NAME", "str", "", "the node whose label selects the config"),
    ManagerOption("node_label", "node-label", "NODE_LABEL", "str", DEFAULT_LABEL, "the label that names the config"),
    ManagerOption("srcdir", "config-file-srcdir", "CONFIG_FILE_SRCDIR", "str", "",
                  "the folder of named configs (the mounted ConfigMap)"),
    ManagerOption("dst", "config-file-dst", "CONFIG_FILE_DST", "str", "",
                  "the symlink the plugin reads (its CONFIG_FILE)"),
    ManagerOption("default_config", "default-config", "DEFAULT_CONFIG", "str", "",
                  "the config for a node without the label"),
    ManagerOption("fallbacks", "fallback-strategies", "FALLBACK_STRATEGIES", "list", (),
                  "without label and default, try in order: named (a config called 'default'), single (the only "
                  "config), empty (no config file)"),
    ManagerOption("send_signal", "send-signal", "SEND_SIGNAL", "bool", True,
                  "signal the plugin after the config changed"),
    ManagerOption("signal", "signal", "SIGNAL", "int", int(signals.SIGHUP), "the signal number to send"),
    ManagerOption("process_to_signal", "process-to-signal", "PROCESS_TO_SIGNAL", "str", DEFAULT_PROCESS,
                  "the process to signal: the first whose argv[0] is exactly this"),
    # nvdp only
    ManagerOption("metrics_address", "metrics-address", "NVDP_CONFIG_MANAGER_METRICS_ADDRESS", "str", "",
                  "serve /metrics and /healthz on HOST:PORT (nvdp only; empty: off)"),
    ManagerOption("api_wait_s", "api-wait", "NVDP_CONFIG_MANAGER_API_WAIT", "float", 30.0,
                  "ONESHOT: seconds to wait for the API server before using the default config (nvdp only)"),
)


@dataclass(frozen=True)
class ManagerSettings:
    node_name: str
    srcdir: str
    dst: str
    node_label: str = DEFAULT_LABEL
    default_config: str = ""
    fallbacks: tuple[FallbackStrategy, ...] = ()
    oneshot: bool = False
    send_signal: bool = True
    signal: int = int(signals.SIGHUP)
    process_to_signal: str = DEFAULT_PROCESS
    kubeconfig: str = ""
    metrics_address: str = ""
    api_wait_s: float = 30.0


def _name(opt: ManagerOption) -> str:
    return f"--{opt.flag} ({opt.env})"


def _parse(opt: ManagerOption, raw: str) -> object:
    name = _name(opt)
    if opt.kind == "bool":
        return parse_go_bool(name, raw)
    if opt.kind == "list":
        return split_list(raw)
    if opt.kind in ("int", "float"):
        try:
            return int(raw) if opt.kind == "int" else float(raw)
        except ValueError:
            raise ConfigError(name, f"{raw!r} is not {'an integer' if opt.kind == 'int' else 'a number'}") from None
    return raw


def load_manager_settings(cli: Mapping[str, str | None], environ: Mapping[str, str]) -> ManagerSettings:
    values: dict[str, object] = {}
    for opt in MANAGER_OPTIONS:
        raw = cli.get(opt.field)
        if raw is None or raw == "":
            raw = environ.get(opt.env) or None
        values[opt.field] = opt.default if raw is None else _parse(opt, raw)
    for field in ("node_name", "node_label", "srcdir", "dst"):
        if not values[field]:
            opt = next(o for o in MANAGER_OPTIONS if o.field == field)
            raise ConfigError(_name(opt), "must not be empty")
    fallbacks = cast(tuple[str, ...], values["fallbacks"])
    for item in fallbacks:
        if item not in FALLBACK_STRATEGIES:
            raise ConfigError("--fallback-strategies (FALLBACK_STRATEGIES)",
                              f"unknown fallback strategy {item!r} (allowed: {', '.join(FALLBACK_STRATEGIES)})")
    number = cast(int, values["signal"])
    if not 1 <= number <= int(signals.SIGRTMAX):
        raise ConfigError("--signal (SIGNAL)", f"{number} is not a signal number (1 = SIGHUP)")
    if values["metrics_address"]:
        from nvdp.config.load import parse_listen_address

        parse_listen_address(str(values["metrics_address"]), "--metrics-address (NVDP_CONFIG_MANAGER_METRICS_ADDRESS)")
    wait = cast(float, values["api_wait_s"])
    if not (math.isfinite(wait) and wait >= 0):
        raise ConfigError("--api-wait (NVDP_CONFIG_MANAGER_API_WAIT)", f"{wait} is not a number of seconds >= 0")
    return ManagerSettings(**values)  # type: ignore[arg-type]  # each value was parsed for its field's kind
