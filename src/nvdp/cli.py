"""Command line: `nvdp serve|labels|devices|demo|doctor|cdi|mps-control-daemon|simulate|status|testing|version`,
and the console scripts `nvidia-device-plugin` (= `nvdp serve`), `gpu-feature-discovery` (= `nvdp labels`)
and `mps-control-daemon`.

The only module that reads argv and os.environ, sets up logging and decides exit codes:
0 stopped cleanly; 1 initialisation failed (NVML, no devices) or an unexpected error;
2 invalid flag, env var or config file (nothing was touched).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from nvdp import __version__
from nvdp.config.load import load
from nvdp.config.options import GFD_OPTIONS, OPTIONS, Config, Option, flag_names, format_duration
from nvdp.errors import ConfigError, DiscoveryError, LabelError, ListenError, NvmlUnavailable, PluginError, ServeError

if TYPE_CHECKING:
    from nvdp.app.discovery import BackendFactory

log = logging.getLogger("nvdp")

# gRPC's C core writes its own lines to stderr (`E1201 ... add_port.cc:83] Failed to add port`),
# in neither of our log formats; every failure it reports also reaches us as a Python error, which
# we log. Set before anything imports grpc; GRPC_VERBOSITY=debug (or error) brings them back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

# `-h` as well as `--help`, as the official binary; subcommands inherit it.
CONTEXT = {"help_option_names": ["-h", "--help"]}
TRY_SIMULATE = ("To try nvdp without a GPU, run it on a simulated node: --simulate dgx-h100 "
                "(nvdp devices --simulate dgx-h100 shows what it would advertise).")

EXIT_INIT_ERROR = 1
EXIT_CONFIG_ERROR = 2


def _table_options(table: Sequence[Option] = OPTIONS) -> list[click.Option]:
    """One click option per row of an option table (OPTIONS: the plugin's; GFD_OPTIONS: GFD's)."""
    options = []
    for opt in table:
        names = [*flag_names(opt), opt.field]
        envs = f" [env: {', '.join(opt.envs)}]" if opt.envs else ""
        default = ",".join(opt.default) if isinstance(opt.default, tuple) else opt.default
        if opt.kind == "duration":
            default = format_duration(opt.default)
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


class _TableParams(click.Command):
    """Also takes every flag of its option table, built when the command is used rather than when
    this module is imported: start-up builds the flags of the one command it runs (~40 options each)."""

    _table_added = False
    table: Sequence[Option] = OPTIONS

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._table_added:
            self.params.extend(_table_options(self.table))
            self._table_added = True
        return super().get_params(ctx)


class TableCommand(_TableParams):
    """A command with the OPTIONS flags (serve, devices, doctor, cdi generate|list)."""


class TableGroup(_TableParams, click.Group):
    """A group with the OPTIONS flags (mps-control-daemon, which also runs without a subcommand)."""


class GfdCommand(_TableParams):
    """A command with GPU feature discovery's flags (labels, gpu-feature-discovery)."""

    table = GFD_OPTIONS


def resolve(cli_values: dict[str, Any], table: Sequence[Option] = OPTIONS) -> Config:
    given = {k: (None if v == () else v) for k, v in cli_values.items()}
    return load(given, os.environ, options=table)


def _config_or_exit(
    cli_values: dict[str, Any], table: Sequence[Option] = OPTIONS, report: Callable[[str], None] | None = None
) -> Config:
    """The config, with every input checked before anything starts (the simulated profile, the
    control socket path); exit 2 naming what is wrong."""
    from nvdp.app.discovery import check_inputs

    try:
        cfg = resolve(cli_values, table)
        check_inputs(cfg)
        return cfg
    except ConfigError as exc:
        (report or _echo_error)(str(exc))
        sys.exit(EXIT_CONFIG_ERROR)


def _echo_error(message: str) -> None:
    click.echo(f"error: {message}", err=True)


def _log_error(message: str) -> None:
    log.error(message)


def _early_logging(cli_values: dict[str, Any]) -> None:
    """Logging from the flags and env vars alone, so that what loading the config logs (e.g. a
    config-file warning) already has the asked-for format; reconfigured once the config is known."""
    from nvdp.ops import logs

    def given(field: str) -> str | None:
        option = next(o for o in OPTIONS if o.field == field)
        return cli_values.get(field) or next((os.environ[e] for e in option.envs if os.environ.get(e)), None)

    level, fmt = (given("log_level") or "info").lower(), (given("log_format") or "text").lower()
    try:
        logs.setup(level, fmt=fmt)
    except (KeyError, ValueError):  # an invalid value: the config check reports it
        logs.setup()


def _without_unused_modules(cfg: Config) -> None:
    """Before asyncio and grpc are imported: without the metrics listener nothing in the plugin
    uses TLS (prometheus_client is the only user of Python's ssl module), so asyncio and grpc are
    told that ssl is absent (a None entry in sys.modules), which they support: 4-5 MB of OpenSSL
    and ~10 ms less (docs/benchmarks.md). Not with --cluster-health either (the Kubernetes API is
    HTTPS). Neither can be turned on by a reload."""
    if not cfg.metrics_address and not cfg.cluster_health and "ssl" not in sys.modules:
        sys.modules["ssl"] = None  # type: ignore[assignment]


def _serve(cli_values: dict[str, Any], backend_factory: BackendFactory | None = None) -> None:
    """`backend_factory`: the NVML-path benchmark (bench/nvml_plugin.py) passes the test fake."""
    from nvdp.ops import logs

    _early_logging(cli_values)
    # Errors are log lines from here on, in the chosen format (a JSON log stays all JSON).
    cfg = _config_or_exit(cli_values, report=_log_error)
    _without_unused_modules(cfg)
    import asyncio

    from nvdp.app.discovery import open_backend
    from nvdp.app.plugin import Plugin

    logs.setup(cfg.log_level, fmt=cfg.log_format)
    cluster_api = None
    if cfg.cluster_health:
        from nvdp.app.cluster_api import open_cluster_api
        from nvdp.kube.connection import client_config

        try:  # as the config-manager: KUBECONFIG / --kubeconfig, else the in-cluster service account
            cluster_api = open_cluster_api(client_config(cfg.kubeconfig, os.environ.get("KUBERNETES_SERVICE_HOST"),
                                                         os.environ.get("KUBERNETES_SERVICE_PORT")))
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_CONFIG_ERROR)
    plugin = Plugin(cfg, backend_factory=backend_factory or open_backend, reload_config=lambda: resolve(cli_values),
                    cluster_api=cluster_api)
    try:
        asyncio.run(plugin.run(handle_signals=True))
    except (ListenError, ServeError) as exc:
        log.error("initialisation failed: %s", exc)
        sys.exit(EXIT_INIT_ERROR)
    except ConfigError as exc:  # e.g. a device list over the kubelet's limit, found before any socket exists
        log.error(str(exc))
        sys.exit(EXIT_CONFIG_ERROR)
    except DiscoveryError as exc:
        log.error("initialisation failed: %s", exc)
        log.error(
            "If this is a GPU node, check that the NVIDIA driver is installed and that the container "
            "runtime makes the driver visible to this container (nvidia runtime as default, or a "
            "RuntimeClass); on a node without GPUs, set --fail-on-init-error=false."
        )
        if isinstance(exc, NvmlUnavailable):
            log.error(TRY_SIMULATE)
        sys.exit(EXIT_INIT_ERROR)
    except PluginError as exc:  # named failures (e.g. the health checks'): a message, not a traceback
        log.error("stopped on an error: %s", exc)
        sys.exit(EXIT_INIT_ERROR)


def _labels(cli_values: dict[str, Any]) -> None:
    from nvdp.app.labeller import Labeller
    from nvdp.app.labels_output import NodeFeatureClient
    from nvdp.ops import logs

    _early_logging(cli_values)
    cfg = _config_or_exit(cli_values, GFD_OPTIONS)
    logs.setup(cfg.log_level, fmt=cfg.log_format)
    def node_feature_client(cfg: Config) -> NodeFeatureClient:  # only with --use-node-feature-api=true
        from nvdp.app.nodefeature_client import KubeNodeFeatureClient
        from nvdp.kube.connection import client_config

        try:
            config = client_config(cfg.kubeconfig, os.environ.get("KUBERNETES_SERVICE_HOST"),
                                   os.environ.get("KUBERNETES_SERVICE_PORT"))
        except ConfigError as exc:
            raise ConfigError("--use-node-feature-api", f"{exc}; or run with --use-node-feature-api=false "
                              "(USE_NODE_FEATURE_API=false) to write the NFD local feature file instead") from exc
        return KubeNodeFeatureClient(config)

    labeller = Labeller(cfg, reload_config=lambda: resolve(cli_values, GFD_OPTIONS),
                        client_factory=node_feature_client)
    import asyncio

    try:
        asyncio.run(labeller.run(handle_signals=True))
    except ConfigError as exc:  # e.g. the NodeFeature API without a client, found before any discovery
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    except DiscoveryError as exc:
        log.error("initialisation failed: %s", exc)
        log.error("If this is a GPU node, check that the NVIDIA driver is installed and visible to this "
                  "container; on a node without GPUs, set --fail-on-init-error=false.")
        sys.exit(EXIT_INIT_ERROR)
    except (LabelError, PluginError) as exc:
        log.error("labelling failed: %s", exc)
        sys.exit(EXIT_INIT_ERROR)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="nvdp")
def main() -> None:
    """nvdp: the NVIDIA GPU device plugin for Kubernetes."""


@main.command(cls=TableCommand)
def serve(**cli_values: Any) -> None:
    """Run the device plugin (what `nvidia-device-plugin` runs)."""
    _serve(cli_values)


@click.command(name="nvidia-device-plugin", cls=TableCommand, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="nvidia-device-plugin")
def serve_main(**cli_values: Any) -> None:
    """NVIDIA device plugin for Kubernetes (nvdp), with the official plugin's flags and env vars."""
    _serve(cli_values)


@main.command(cls=GfdCommand)
def labels(**cli_values: Any) -> None:
    """Run GPU feature discovery: label this node's GPUs for NFD (what `gpu-feature-discovery` runs)."""
    _labels(cli_values)


@click.command(name="gpu-feature-discovery", cls=GfdCommand, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="gpu-feature-discovery")
def gfd_main(**cli_values: Any) -> None:
    """GPU feature discovery (nvdp): node labels for NFD, with the official GFD's flags and env vars."""
    _labels(cli_values)


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
        if isinstance(exc, NvmlUnavailable):
            click.echo(TRY_SIMULATE, err=True)
        sys.exit(EXIT_INIT_ERROR)
    for problem in plan.problems:
        click.echo(f"{problem.level}: {problem.message}", err=True)
    tree = plan.tree
    click.echo(json.dumps(devices_json(node, tree), indent=2) if as_json else devices_table(node, tree))


@main.command()
@click.option("--profile", default="dgx-h100", show_default=True, help="simulated node profile")
@click.option("--device-list-strategy", default=None, metavar="LIST",
              help="e.g. cdi-cri: also show the CDI names and the spec the plugin writes for them")
@click.option("--sharing", type=click.Choice(["none", "mps"]), default="none", show_default=True,
              help="mps: two GPUs shared with MPS, with the simulated MPS control daemon (docs/sharing.md)")
@click.option("--node-config", is_flag=True,
              help="show per-node configs instead: the node label, the config-manager and a switching plugin")
def demo(profile: str, device_list_strategy: str | None, sharing: str, node_config: bool) -> None:
    """Run the plugin on a simulated node against a fake kubelet and narrate what it sees."""
    import asyncio

    from nvdp.ops import logs
    from nvdp.tools.demo import run_demo
    from nvdp.tools.demo_mps import run_mps_demo

    logs.setup("critical" if node_config else "error")  # the narration says what happens
    try:
        if node_config:
            if sharing != "none" or device_list_strategy is not None:
                raise click.UsageError("--node-config shows its own scenario: drop --sharing and "
                                       "--device-list-strategy")
            from nvdp.tools.demo_nodeconfig import run_node_config_demo

            asyncio.run(run_node_config_demo(click.echo, profile))
        elif sharing == "mps":
            asyncio.run(run_mps_demo(profile, click.echo))
        else:
            asyncio.run(run_demo(profile, click.echo, device_list_strategy))
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


@main.group()
def cdi() -> None:
    """CDI specs for the cdi-* list strategies (what the plugin writes to --cdi-spec-dir)."""


@cdi.command(name="generate", cls=TableCommand)
@click.option("--output", metavar="FILE", help="write the spec to FILE (atomically) instead of printing it")
@click.option("--format", "fmt", type=click.Choice(["json", "yaml"]), default="json", show_default=True)
@click.option("--class", "cls", type=click.Choice(["gpu", "gdrcopy", "gds", "mofed", "imex-channel"]), default="gpu",
              show_default=True, help="which spec: the GPUs, or a feature's")
def cdi_generate(output: str | None, fmt: str, cls: str, **cli_values: Any) -> None:
    """Generate the CDI spec the plugin would write, from the same flags (see docs/cdi.md)."""
    from nvdp.tools import cdi as tool

    generated = _cdi_or_exit(tool.generate_specs, _config_or_exit(cli_values))
    for note in generated.specs.notes:
        click.echo(f"warning: {note}", err=True)
    spec = generated.specs.get(cls)
    if spec is None:
        click.echo(f"error: no {cls} spec for this node: the feature is off or its device nodes are missing", err=True)
        sys.exit(EXIT_INIT_ERROR)
    if generated.temporary_root:
        click.echo("warning: the simulated driver root is a temporary folder, removed on exit; give --driver-root "
                   "DIR to keep it (and the paths in this spec)", err=True)
    text = tool.render(spec.doc, fmt)
    if output is None:
        click.echo(text, nl=False)
        return
    from nvdp.backends.spec_files import write_atomically

    _cdi_or_exit(write_atomically, output, text)
    click.echo(f"wrote {output}: {len(spec.device_names)} device(s), cdiVersion {spec.doc['cdiVersion']}", err=True)


@cdi.command(name="list", cls=TableCommand)
def cdi_list(**cli_values: Any) -> None:
    """Print the qualified CDI device names nvdp's specs define for this node, one per line."""
    from nvdp.tools import cdi as tool

    generated = _cdi_or_exit(tool.generate_specs, _config_or_exit(cli_values))
    for spec in generated.specs.specs:
        for name in spec.qualified_names():
            click.echo(name)


def _cdi_or_exit(call: Callable[..., Any], *args: Any) -> Any:
    from nvdp.errors import CdiSpecError

    try:
        return call(*args)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    except (DiscoveryError, CdiSpecError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_INIT_ERROR)


@main.group(name="testing")
def testing_group() -> None:
    """Test helpers shipped with nvdp (a fake kubelet to run a plugin against by hand)."""


@testing_group.command(name="fake-kubelet")
@click.option("--dir", "folder", required=True, metavar="DIR",
              help="the folder for kubelet.sock (start the plugin with --kubelet-socket DIR/kubelet.sock)")
@click.option("--allocate", default=0, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="once a resource has N healthy devices, ask GetPreferredAllocation and Allocate for N of them")
def fake_kubelet(folder: str, allocate: int) -> None:
    """A kubelet device manager on DIR/kubelet.sock that prints what it sees (until SIGINT/SIGTERM)."""
    import asyncio
    import signal

    from nvdp.testing.kubelet_sim import run_fake_kubelet

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_fake_kubelet(folder, allocate, click.echo, stop)

    asyncio.run(serve())


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"nvdp {__version__}")


@main.group()
def health() -> None:
    """The health policy as it applies on this node."""


@health.command(name="policy", cls=TableCommand)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def health_policy(as_json: bool, **cli_values: Any) -> None:
    """Print the effective XID table (built-in, then the config file, then DP_*_HEALTHCHECKS)."""
    from nvdp.tools.health_policy import policy_json, policy_text

    cfg = _config_or_exit(cli_values)
    click.echo(json.dumps(policy_json(cfg), indent=2) if as_json else policy_text(cfg))


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
@click.option("--recovery-action", metavar="ACTION",
              help="what the driver asks for: none, gpu-reset, node-reboot, drain-p2p, drain-and-reset (or a number)")
@click.pass_context
def inject_xid(ctx: click.Context, gpu: str, xid: int, gi: int | None, ci: int | None,
               recovery_action: str | None) -> None:
    """An XID critical error event on a GPU (optionally one MIG instance of it)."""
    action: int | str | None = _gpu(recovery_action) if recovery_action is not None else None
    _send(ctx, {"command": "xid", "gpu": _gpu(gpu), "xid": xid, "gi": gi, "ci": ci, "recovery_action": action})


@inject.command(name="hang")
@click.option("--gpu", help="GPU index or UUID whose probe hangs")
@click.option("--events", is_flag=True, help="every NVML event wait hangs")
@click.option("--release", is_flag=True, help="every hung call returns; nothing hangs any more")
@click.pass_context
def inject_hang(ctx: click.Context, gpu: str | None, events: bool, release: bool) -> None:
    """NVML calls that do not return, as with a wedged driver (see docs/health.md)."""
    if not (gpu or events or release):
        raise click.UsageError("give --gpu, --events or --release")
    _send(ctx, {"command": "hang", "gpu": _gpu(gpu) if gpu else None, "events": events, "release": release})


@inject.command(name="dirty")
@_GPU
@click.option("--pids", default="", metavar="PIDS", help="comma-separated compute process IDs left on the GPU")
@click.option("--memory-mib", default=0, show_default=True, type=click.IntRange(min=0), help="MiB of memory in use")
@click.option("--clean", is_flag=True, help="the GPU is clean again")
@click.pass_context
def inject_dirty(ctx: click.Context, gpu: str, pids: str, memory_mib: int, clean: bool) -> None:
    """Leave processes or memory on a GPU, as a previous pod might (--gpu-hygiene)."""
    try:
        ids = [int(p) for p in pids.split(",") if p.strip()]
    except ValueError:
        raise click.BadParameter(f"{pids!r} is not a list of process IDs", param_hint="--pids") from None
    _send(ctx, {"command": "dirty", "gpu": _gpu(gpu), "pids": ids, "memory_mib": memory_mib, "clean": clean})


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


@simulate.command(name="mps-control", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def simulate_mps_control(args: tuple[str, ...]) -> None:
    """A simulated nvidia-cuda-mps-control: `-d` starts a daemon, else commands on stdin (docs/sharing.md)."""
    from nvdp.backends.simulated.mps_control import main as control

    sys.exit(control(args, os.environ, sys.stdin, sys.stdout))


@simulate.command(name="nvidia-smi", context_settings={"ignore_unknown_options": True})
@click.option("--state", required=True, metavar="FILE", help="JSON file keeping each GPU's compute mode")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def simulate_nvidia_smi(state: str, args: tuple[str, ...]) -> None:
    """A simulated nvidia-smi for compute modes: `-i GPU -c MODE`, `-i GPU --query-gpu=compute_mode`."""
    from nvdp.backends.simulated.nvidia_smi import main as smi

    sys.exit(smi(args, state, sys.stdout))


def _mps_daemon(cli_values: dict[str, Any]) -> None:
    import asyncio

    from nvdp.app.mps_daemon import ControlDaemon
    from nvdp.ops import logs

    def config() -> Config:
        given = {k: (None if v == () else v) for k, v in cli_values.items()}
        return load(given, os.environ, require_mps_root=False)

    _early_logging(cli_values)
    cfg = _config_or_exit_daemon(cli_values)
    logs.setup(cfg.log_level, fmt=cfg.log_format)
    try:
        asyncio.run(ControlDaemon(cfg, reload_config=config).run(handle_signals=True))
    except ConfigError as exc:  # the sharing config does not fit the node (found before any daemon starts)
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    except DiscoveryError as exc:
        log.error("initialisation failed: %s", exc)
        sys.exit(EXIT_INIT_ERROR)


@click.group(name="mps-control-daemon", cls=TableGroup, invoke_without_command=True, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="mps-control-daemon")
@click.pass_context
def mps_daemon_main(ctx: click.Context, /, **cli_values: Any) -> None:
    """Start and supervise one MPS control daemon per MPS-shared resource (docs/sharing.md)."""
    ctx.obj = cli_values
    if ctx.invoked_subcommand is None:
        _mps_daemon(cli_values)


@mps_daemon_main.command(name="mount-shm")
@click.option("--mount", "mount_command", default="mount", show_default=True, help="the mount program")
@click.option("--meminfo", default="/proc/meminfo", show_default=True, help="where MemTotal is read")
@click.option("--mountinfo", default="/proc/self/mountinfo", show_default=True,
              help="where an existing mount is looked for")
@click.pass_context
def mps_mount_shm(ctx: click.Context, mount_command: str, meminfo: str, mountinfo: str) -> None:
    """Mount a tmpfs of half the node's memory at <mps-dir>/shm (the chart's init container)."""
    from pathlib import Path

    from nvdp.app.mps_daemon import mount_shm
    from nvdp.errors import MpsError
    from nvdp.ops import logs

    logs.setup()
    cfg = _config_or_exit_daemon(ctx.obj)

    def text(path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError:
            return ""

    try:
        click.echo(mount_shm(cfg.mps_dir, mount_command, text(meminfo), text(mountinfo)))
    except (MpsError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_INIT_ERROR)


def _config_or_exit_daemon(cli_values: dict[str, Any]) -> Config:
    try:
        return load({k: (None if v == () else v) for k, v in cli_values.items()}, os.environ,
                    require_mps_root=False)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)


main.add_command(mps_daemon_main)


# ---------------------------------------------------------------------------------------------
# config-manager (docs/configuration.md): the official config-manager's flags and env vars


def _manager_options(f: Callable[..., Any]) -> Callable[..., Any]:
    from nvdp.config.manager import MANAGER_OPTIONS

    for opt in reversed(MANAGER_OPTIONS):
        default = ",".join(map(str, opt.default)) if isinstance(opt.default, tuple) else opt.default
        text = f"{opt.help} [env: {opt.env}] [default: {default}]"
        if opt.kind == "bool":  # `--oneshot` alone means true, `--oneshot=false` works too (urfave/cli)
            f = click.option(f"--{opt.flag}", opt.field, is_flag=False, flag_value="true", default=None,
                             metavar="BOOL", help=text)(f)
        else:
            f = click.option(f"--{opt.flag}", opt.field, default=None, metavar=opt.kind.upper(), help=text)(f)
    return f


def _config_manager(cli_values: dict[str, Any]) -> None:
    from nvdp.app.config_manager import run_config_manager
    from nvdp.config.manager import load_manager_settings
    from nvdp.kube.connection import client_config
    from nvdp.ops import logs

    logs.setup(os.environ.get("NVDP_LOG_LEVEL") or "info", fmt=os.environ.get("NVDP_LOG_FORMAT") or "text")
    try:
        settings = load_manager_settings(cli_values, os.environ)
        config = client_config(settings.kubeconfig, os.environ.get("KUBERNETES_SERVICE_HOST"),
                               os.environ.get("KUBERNETES_SERVICE_PORT"))
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    import asyncio

    try:
        asyncio.run(run_config_manager(settings, config))
    except ConfigError as exc:  # e.g. the chosen config file is invalid and there is no current one to keep
        log.error("config-manager: %s", exc)
        sys.exit(EXIT_INIT_ERROR)
    except (PluginError, ListenError) as exc:  # a config folder or link it cannot use
        log.error("config-manager: %s", exc)
        sys.exit(EXIT_INIT_ERROR)


@main.command(name="config-manager", context_settings=CONTEXT)
@_manager_options
def config_manager(**cli_values: Any) -> None:
    """Point the plugin's config at the named config the node label selects (what the chart's
    init container and sidecar run); see docs/configuration.md."""
    _config_manager(cli_values)


@click.command(name="config-manager", context_settings=CONTEXT)
@click.version_option(__version__, prog_name="config-manager")
@_manager_options
def config_manager_main(**cli_values: Any) -> None:
    """nvdp's config-manager, with the official config-manager's flags and env vars."""
    _config_manager(cli_values)


# The container image's binaries (deployments/container/install.sh), by their official names.
IMAGE_PROGRAMS: dict[str, click.Command] = {
    "nvidia-device-plugin": serve_main,
    "gpu-feature-discovery": gfd_main,
    "mps-control-daemon": mps_daemon_main,
    "config-manager": config_manager_main,
}


def image_main() -> None:
    """`python -m nvdp.entrypoint`: the program named by argv[0] as the image's wrapper exec'd it
    (`sys.orig_argv`: the interpreter's own argv[0], which `-m` hides from `sys.argv`); the plugin
    for any other name."""
    name = os.path.basename(sys.orig_argv[0]) if sys.orig_argv else ""
    if name not in IMAGE_PROGRAMS:
        name = "nvidia-device-plugin"
    IMAGE_PROGRAMS[name](prog_name=name)
