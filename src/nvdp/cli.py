"""Command line: `nvdp serve|devices|demo|doctor|simulate|status|version`, and `nvidia-device-plugin` (= `nvdp serve`).

The only module that reads argv and os.environ, sets up logging and decides exit codes:
0 stopped cleanly; 1 initialisation failed (NVML, no devices) or an unexpected error;
2 invalid flag, env var or config file (nothing was touched).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import click

from nvdp import __version__
from nvdp.config.load import load
from nvdp.config.options import OPTIONS, Config
from nvdp.errors import ConfigError, DiscoveryError, ListenError, PluginError, ServeError

if TYPE_CHECKING:
    from nvdp.app.discovery import BackendFactory

log = logging.getLogger("nvdp")

EXIT_INIT_ERROR = 1
EXIT_CONFIG_ERROR = 2


def _table_options() -> list[click.Option]:
    """One click option per row of the OPTIONS table."""
    options = []
    for opt in OPTIONS:
        names = [f"--{opt.flag}", *(f"--{a}" for a in opt.aliases), opt.field]
        envs = f" [env: {', '.join(opt.envs)}]" if opt.envs else ""
        default = ",".join(opt.default) if isinstance(opt.default, tuple) else opt.default
        text = f"{opt.help or opt.flag.replace('-', ' ')}{envs} [default: {default}]"
        if opt.choices:
            text += f" [one of: {', '.join(opt.choices)}]"
        if opt.kind == "bool":
            # `--flag` alone means true; `--flag=false` works as with the official plugin.
            options.append(click.Option(names, is_flag=False, flag_value="true", default=None, help=text,
                                        metavar="BOOL"))
        elif opt.kind in ("list", "intlist"):
            options.append(click.Option(names, multiple=True, default=None, help=text + " (comma-separated)"))
        else:
            options.append(click.Option(names, default=None, help=text))
    return options


class TableCommand(click.Command):
    """A command that also takes every OPTIONS flag, built when the command is used rather than
    when this module is imported: start-up builds the flags of the one command it runs."""

    _table_added = False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._table_added:
            self.params.extend(_table_options())
            self._table_added = True
        return super().get_params(ctx)


def resolve(cli_values: dict[str, Any]) -> Config:
    given = {k: (None if v == () else v) for k, v in cli_values.items()}
    return load(given, os.environ)


def _config_or_exit(cli_values: dict[str, Any]) -> Config:
    try:
        return resolve(cli_values)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)


def _early_logging(cli_values: dict[str, Any]) -> None:
    """Logging from the flags and env vars alone, so that what loading the config logs (e.g. a
    config-file warning) already has the asked-for format; reconfigured once the config is known."""
    from nvdp.ops import logs

    def given(field: str) -> str | None:
        option = next(o for o in OPTIONS if o.field == field)
        return cli_values.get(field) or next((os.environ[e] for e in option.envs if os.environ.get(e)), None)

    level, fmt = given("log_level") or "info", given("log_format") or "text"
    try:
        logs.setup(level, fmt=fmt)
    except (KeyError, ValueError):  # an invalid value: the config check reports it
        logs.setup()


def _without_unused_modules(cfg: Config) -> None:
    """Before asyncio and grpc are imported: without the metrics listener nothing in the plugin
    uses TLS (prometheus_client is the only user of Python's ssl module), so asyncio and grpc are
    told that ssl is absent (a None entry in sys.modules), which they support: 4-5 MB of OpenSSL
    and ~10 ms less (docs/benchmarks.md). The listener cannot be turned on by a reload."""
    if not cfg.metrics_address and "ssl" not in sys.modules:
        sys.modules["ssl"] = None  # type: ignore[assignment]


def _serve(cli_values: dict[str, Any], backend_factory: BackendFactory | None = None) -> None:
    """`backend_factory`: the NVML-path benchmark (bench/nvml_plugin.py) passes the test fake."""
    from nvdp.ops import logs

    _early_logging(cli_values)
    cfg = _config_or_exit(cli_values)
    _without_unused_modules(cfg)
    import asyncio

    from nvdp.app.discovery import open_backend
    from nvdp.app.plugin import Plugin

    logs.setup(cfg.log_level, fmt=cfg.log_format)
    plugin = Plugin(cfg, backend_factory=backend_factory or open_backend, reload_config=lambda: resolve(cli_values))
    try:
        asyncio.run(plugin.run(handle_signals=True))
    except (ListenError, ServeError) as exc:
        log.error("initialisation failed: %s", exc)
        sys.exit(EXIT_INIT_ERROR)
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
    except PluginError as exc:  # named failures (e.g. the health checks'): a message, not a traceback
        log.error("stopped on an error: %s", exc)
        sys.exit(EXIT_INIT_ERROR)


@click.group()
@click.version_option(__version__, prog_name="nvdp")
def main() -> None:
    """nvdp: the NVIDIA GPU device plugin for Kubernetes."""


@main.command(cls=TableCommand)
def serve(**cli_values: Any) -> None:
    """Run the device plugin (what `nvidia-device-plugin` runs)."""
    _serve(cli_values)


@click.command(name="nvidia-device-plugin", cls=TableCommand)
@click.version_option(__version__, prog_name="nvidia-device-plugin")
def serve_main(**cli_values: Any) -> None:
    """NVIDIA device plugin for Kubernetes (nvdp), with the official plugin's flags and env vars."""
    _serve(cli_values)


@main.command(cls=TableCommand)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def devices(as_json: bool, **cli_values: Any) -> None:
    """Print what would be advertised for the current flags and backend."""
    from nvdp.app.discovery import discover_once
    from nvdp.tools.report import devices_json, devices_table

    cfg = _config_or_exit(cli_values)
    try:
        node, plan = discover_once(cfg)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    except DiscoveryError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_INIT_ERROR)
    for problem in plan.problems:
        click.echo(f"{problem.level}: {problem.message}", err=True)
    tree = plan.tree
    click.echo(json.dumps(devices_json(node, tree), indent=2) if as_json else devices_table(node, tree))


@main.command()
@click.option("--profile", default="dgx-h100", show_default=True, help="simulated node profile")
def demo(profile: str) -> None:
    """Run the plugin on a simulated node against a fake kubelet and narrate what it sees."""
    import asyncio

    from nvdp.ops import logs
    from nvdp.tools.demo import run_demo

    logs.setup("error")  # the narration says what happens; warnings about injected faults would repeat it
    try:
        asyncio.run(run_demo(profile, click.echo))
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)


@main.command(cls=TableCommand)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
@click.option("--proc-root", default="/proc", show_default=True, help="the node's /proc")
@click.option("--sys-root", default="/sys", show_default=True, help="the node's /sys")
@click.option("--etc-root", default="/etc", show_default=True, help="the node's /etc (container runtime, CDI)")
@click.option("--run-root", default="/run", show_default=True, help="the node's /run (CDI specs)")
@click.option("--var-root", default="/var", show_default=True, help="the node's /var (k3s and RKE2 containerd)")
def doctor(as_json: bool, proc_root: str, sys_root: str, etc_root: str, run_root: str, var_root: str,
           **cli_values: Any) -> None:
    """Check this node for what the plugin needs; exit 1 when something blocks it."""
    import asyncio
    from dataclasses import replace
    from pathlib import Path

    from nvdp.app.discovery import open_backend
    from nvdp.tools import doctor as dr

    cfg = _config_or_exit(cli_values)
    layout = dr.Layout.from_config(cfg, proc=Path(proc_root), sys=Path(sys_root), etc=Path(etc_root),
                                   run=Path(run_root), var=Path(var_root))
    # The plugin's own backend factory, looking for the driver where doctor found the driver root.
    backend_cfg = replace(cfg, container_driver_root=str(layout.driver_root))
    checks = dr.Doctor(cfg, layout, lambda: open_backend(backend_cfg), simulated=bool(cfg.simulate))
    try:
        results = asyncio.run(checks.run())
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    click.echo(json.dumps(dr.to_json(results), indent=2) if as_json else "\n".join(dr.render(results)))
    sys.exit(1 if dr.blocking(results) else 0)


@main.command()
@click.option("--address", envvar="NVDP_METRICS_ADDRESS", required=True,
              help="the plugin's --metrics-address (HOST:PORT) or a URL [env: NVDP_METRICS_ADDRESS]")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
def status(address: str, as_json: bool) -> None:
    """Show a running plugin's devices, health and registrations (read from its /metrics)."""
    from nvdp.tools import status as st

    try:
        view = st.parse(st.fetch(st.metrics_url(address)))
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    except st.StatusError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(json.dumps(view.to_json(), indent=2) if as_json else st.render(view))


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"nvdp {__version__}")


@main.group()
def simulate() -> None:
    """Tools for a plugin running on a simulated node (--simulate)."""


@simulate.group()
@click.option("--control", required=True, envvar="NVDP_SIMULATE_CONTROL", metavar="PATH",
              help="the plugin's --simulate-control socket [env: NVDP_SIMULATE_CONTROL]")
@click.pass_context
def inject(ctx: click.Context, control: str) -> None:
    """Inject a fault into the running simulated node (see docs/health.md)."""
    ctx.obj = control


def _send(ctx: click.Context, message: dict[str, Any]) -> None:
    from nvdp.backends.simulated.control import request

    path = ctx.obj
    try:
        reply = request(path, message)
    except OSError as exc:
        click.echo(f"error: cannot talk to the control socket {path}: {exc}", err=True)
        sys.exit(EXIT_INIT_ERROR)
    if not reply.get("ok"):
        click.echo(f"error: {reply.get('error', reply)}", err=True)
        sys.exit(EXIT_INIT_ERROR)
    click.echo(reply.get("message", "ok"))


def _gpu(value: str) -> int | str:
    return int(value) if value.isdigit() else value


_GPU = click.option("--gpu", required=True, help="GPU index or UUID")


@inject.command(name="xid")
@_GPU
@click.option("--xid", required=True, type=click.IntRange(min=0), help="the XID number")
@click.option("--gi", type=click.IntRange(min=0), help="MIG GPU instance the event names")
@click.option("--ci", type=click.IntRange(min=0), help="MIG compute instance the event names (needs --gi)")
@click.pass_context
def inject_xid(ctx: click.Context, gpu: str, xid: int, gi: int | None, ci: int | None) -> None:
    """An XID critical error event on a GPU (optionally one MIG instance of it)."""
    _send(ctx, {"command": "xid", "gpu": _gpu(gpu), "xid": xid, "gi": gi, "ci": ci})


@inject.command(name="lose")
@_GPU
@click.pass_context
def inject_lose(ctx: click.Context, gpu: str) -> None:
    """The GPU falls off the bus (probes fail with GPU_IS_LOST)."""
    _send(ctx, {"command": "lose", "gpu": _gpu(gpu)})


@inject.command(name="restore")
@_GPU
@click.pass_context
def inject_restore(ctx: click.Context, gpu: str) -> None:
    """The GPU comes back after a reset (counters and pending flags cleared)."""
    _send(ctx, {"command": "restore", "gpu": _gpu(gpu)})


@inject.command(name="ecc")
@_GPU
@click.option("--count", default=1, show_default=True, type=click.IntRange(min=0),
              help="rise of the volatile uncorrectable ECC counter")
@click.option("--remap-pending", is_flag=True, help="also set 'row remapping pending'")
@click.option("--remap-failed", is_flag=True, help="also set 'row remapping failed'")
@click.option("--retired-pending", is_flag=True, help="also set 'page retirement pending'")
@click.pass_context
def inject_ecc(ctx: click.Context, gpu: str, count: int, remap_pending: bool, remap_failed: bool,
               retired_pending: bool) -> None:
    """ECC counters rise (seen by the next probe)."""
    _send(ctx, {"command": "ecc", "gpu": _gpu(gpu), "count": count, "remap_pending": remap_pending,
                "remap_failed": remap_failed, "retired_pending": retired_pending})


@inject.command(name="mig-layout")
@_GPU
@click.option("--devices", default="", metavar="PROFILES",
              help="comma-separated MIG profiles in slot order, e.g. 3g.20gb,2g.10gb (empty: MIG on, no devices)")
@click.option("--disable", is_flag=True, help="turn MIG off on the GPU instead")
@click.option("--no-rescan", is_flag=True, help="leave it to the plugin's next rescan or SIGHUP")
@click.pass_context
def inject_mig_layout(ctx: click.Context, gpu: str, devices: str, disable: bool, no_rescan: bool) -> None:
    """Repartition a GPU's MIG devices (as mig-parted would); see docs/mig.md."""
    profiles = [d.strip() for d in devices.split(",") if d.strip()]
    _send(ctx, {"command": "mig-layout", "gpu": _gpu(gpu), "devices": profiles, "disable": disable,
                "no_rescan": no_rescan})


@inject.command(name="wait-errors")
@click.option("--count", required=True, type=click.IntRange(min=0), help="how many event waits fail")
@click.pass_context
def inject_wait_errors(ctx: click.Context, count: int) -> None:
    """The next COUNT NVML event waits fail (a wedged NVML)."""
    _send(ctx, {"command": "wait-errors", "count": count})
