"""Command line: `nvdp serve|devices|demo|version`, and `nvidia-device-plugin` (= `nvdp serve`).

The only module that reads argv and os.environ, sets up logging and decides exit codes:
0 stopped cleanly; 1 initialisation failed (NVML, no devices) or an unexpected error;
2 invalid flag, env var or config file (nothing was touched).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from nvdp import __version__
from nvdp.config import OPTIONS, Config, load
from nvdp.errors import ConfigError, DiscoveryError

log = logging.getLogger("nvdp")

EXIT_INIT_ERROR = 1
EXIT_CONFIG_ERROR = 2


def _option_decorators(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(OPTIONS):
        names = [f"--{opt.flag}", *(f"--{a}" for a in opt.aliases), opt.field]
        envs = f" [env: {', '.join(opt.envs)}]" if opt.envs else ""
        default = ",".join(opt.default) if isinstance(opt.default, tuple) else opt.default
        text = f"{opt.help or opt.flag.replace('-', ' ')}{envs} [default: {default}]"
        if opt.choices:
            text += f" [one of: {', '.join(opt.choices)}]"
        if opt.kind == "bool":
            # `--flag` alone means true; `--flag=false` works as with the official plugin.
            f = click.option(*names, is_flag=False, flag_value="true", default=None, help=text,
                             metavar="BOOL")(f)
        elif opt.kind in ("list", "intlist"):
            f = click.option(*names, multiple=True, default=None, help=text + " (comma-separated)")(f)
        else:
            f = click.option(*names, default=None, help=text)(f)
    return f


def resolve(cli_values: dict[str, Any]) -> Config:
    given = {k: (None if v == () else v) for k, v in cli_values.items()}
    return load(given, os.environ)


def _config_or_exit(cli_values: dict[str, Any]) -> Config:
    try:
        return resolve(cli_values)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)


def _serve(cli_values: dict[str, Any]) -> None:
    from nvdp import logs
    from nvdp.app import Plugin

    cfg = _config_or_exit(cli_values)
    logs.setup(cfg.log_level)
    plugin = Plugin(cfg, reload_config=lambda: resolve(cli_values))
    try:
        asyncio.run(plugin.run(handle_signals=True))
    except ConfigError as exc:  # e.g. an invalid simulated profile, found before any socket exists
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    except DiscoveryError as exc:
        log.error("initialisation failed: %s", exc)
        log.error(
            "If this is a GPU node, check that the NVIDIA driver is installed and that the container "
            "runtime makes the driver visible to this container (nvidia runtime as default, or a "
            "RuntimeClass); on a node without GPUs, set --fail-on-init-error=false."
        )
        sys.exit(EXIT_INIT_ERROR)


@click.group()
@click.version_option(__version__, prog_name="nvdp")
def main() -> None:
    """nvdp: the NVIDIA GPU device plugin for Kubernetes."""


@main.command()
@_option_decorators
def serve(**cli_values: Any) -> None:
    """Run the device plugin (what `nvidia-device-plugin` runs)."""
    _serve(cli_values)


@click.command(name="nvidia-device-plugin")
@click.version_option(__version__, prog_name="nvidia-device-plugin")
@_option_decorators
def serve_main(**cli_values: Any) -> None:
    """NVIDIA device plugin for Kubernetes (nvdp), with the official plugin's flags and env vars."""
    _serve(cli_values)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@_option_decorators
def devices(as_json: bool, **cli_values: Any) -> None:
    """Print what would be advertised for the current flags and backend."""
    from nvdp.app import discover_tree, open_backend
    from nvdp.report import devices_json, devices_table

    cfg = _config_or_exit(cli_values)
    try:
        backend = open_backend(cfg)
        node, tree = discover_tree(backend, cfg)
        backend.close()
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    except DiscoveryError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_INIT_ERROR)
    click.echo(json.dumps(devices_json(node, tree), indent=2) if as_json else devices_table(node, tree))


@main.command()
@click.option("--profile", default="dgx-h100", show_default=True, help="simulated node profile")
def demo(profile: str) -> None:
    """Run the plugin on a simulated node against a fake kubelet and narrate what it sees."""
    from nvdp.demo import run_demo

    try:
        asyncio.run(run_demo(profile, click.echo))
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"nvdp {__version__}")
