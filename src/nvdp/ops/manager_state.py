"""What the config-manager reports: plain Python, read by its /metrics (ops/manager_metrics.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ManagerState:
    config: str = ""  # the applied config's name ("" = the empty config, or none yet)
    source: str = ""  # why that one: label, default, named, single, empty, kept
    label: str = ""  # the node label's value as last seen ("" = not set)
    unknown_label: str = ""  # the label value naming no config ("" = none)
    problem: str = ""  # why the last change could not be applied ("" = none)
    api_up: bool = False  # the last call to the API server succeeded
    switches: int = 0  # the link was re-pointed
    signals: int = 0  # a signal was sent to the plugin
    signals_skipped: int = 0  # the plugin was not running (it reads the link when it starts)
    api_errors: int = 0
    events_posted: int = 0
