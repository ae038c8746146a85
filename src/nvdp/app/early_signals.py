"""Signal handling from the first moment of the process until the plugin's event loop takes over.

Starting takes a few hundred milliseconds (imports, the config, discovery) before the plugin's
loop handles SIGHUP and SIGTERM; with the default actions, a SIGHUP in that time killed the
plugin (a config-manager sidecar may send one that early) and a SIGTERM ended it with -15. The
console scripts call `install()` before importing anything heavy (`nvdp/launch.py`):

- SIGHUP is remembered; the plugin applies it (one reload) once it runs (`take_reload()`).
- SIGTERM and SIGINT end the process at once with exit 0 (`SystemExit`): nothing is open yet
  that needs closing (the plugin installs its own handlers before it opens anything, and from
  then on a stop request also cancels a start-up that is still under way).

This module imports only `signal`, so that installing costs nothing.
"""

from __future__ import annotations

import signal
from types import FrameType

HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
_reload_pending = False


def install() -> None:
    signal.signal(signal.SIGHUP, _remember_reload)
    signal.signal(signal.SIGTERM, _exit_now)
    signal.signal(signal.SIGINT, _exit_now)


def installed() -> bool:
    return signal.getsignal(signal.SIGHUP) is _remember_reload


def take_reload() -> bool:
    """Whether a SIGHUP arrived since the last call (and forget it)."""
    global _reload_pending
    pending, _reload_pending = _reload_pending, False
    return pending


def _remember_reload(signum: int, frame: FrameType | None) -> None:
    global _reload_pending
    _reload_pending = True


def _exit_now(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
