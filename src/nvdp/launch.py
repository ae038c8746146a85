"""The console scripts' entry points: signal handlers first, then everything else.

`nvidia-device-plugin` (and `python -m nvdp.entrypoint`, the image's) and `nvdp serve` install
`app.early_signals` before the CLI, asyncio, click or gRPC are imported, so a SIGHUP or SIGTERM
in the first few hundred milliseconds is handled instead of killing the process. The other
`nvdp` commands keep the default signal behaviour.
"""

from __future__ import annotations

import sys

from nvdp.app import early_signals


def nvidia_device_plugin() -> None:
    early_signals.install()
    from nvdp.cli import serve_main

    serve_main()


def nvdp() -> None:
    if sys.argv[1:2] == ["serve"]:
        early_signals.install()
    from nvdp.cli import main

    main()
