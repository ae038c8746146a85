"""The console scripts' entry points: signal handlers first, then everything else.

Every console script (`nvidia-device-plugin`, `gpu-feature-discovery`, `mps-control-daemon`,
`config-manager`), the image's `python -m nvdp.entrypoint`, and the `nvdp` commands that run
until stopped (`serve`, `labels`, `mps-control-daemon`, `config-manager`) install
`app.early_signals` before the CLI, asyncio, click or gRPC are imported, so a SIGHUP or SIGTERM
in the first few hundred milliseconds is handled instead of killing the process (a SIGHUP is
applied once the program's own handlers take over; config-manager has no reload, so it is
ignored there). The other `nvdp` commands keep the default signal behaviour.
"""

from __future__ import annotations

import sys

from nvdp.app import early_signals

# `nvdp` subcommands that are long-running programs (the console scripts' equivalents).
LONG_RUNNING = frozenset({"serve", "labels", "mps-control-daemon", "config-manager"})


def nvidia_device_plugin() -> None:
    early_signals.install()
    from nvdp.cli import serve_main

    serve_main()


def gpu_feature_discovery() -> None:
    early_signals.install()
    from nvdp.cli import gfd_main

    gfd_main()


def mps_control_daemon() -> None:
    early_signals.install()
    from nvdp.cli import mps_daemon_main

    mps_daemon_main()


def config_manager() -> None:
    early_signals.install()
    from nvdp.cli import config_manager_main

    config_manager_main()


def nvdp() -> None:
    if sys.argv[1:2] and sys.argv[1] in LONG_RUNNING:
        early_signals.install()
    from nvdp.cli import main

    main()
