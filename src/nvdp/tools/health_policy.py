"""`nvdp health policy`: the XID table as it applies after the config file and the env vars, the
quiet period of each class, and whether the driver's recovery action is followed."""

from __future__ import annotations

from typing import Any

from nvdp.config.options import Config
from nvdp.core.health import check_switches, effective_xids
from nvdp.core.xid_policy import XidTable, render_policy


def _quiet_periods(cfg: Config) -> dict[str, float | None]:
    return {"transient": cfg.health_quiet_period, "fatal": cfg.health_fatal_quiet_period}


def policy_json(cfg: Config) -> dict[str, Any]:
    switches = check_switches(cfg.disable_healthchecks, cfg.enable_healthchecks, XidTable(cfg.xid_overrides).ignored())
    return {
        "health_checks": {"events": switches.events, "probes": switches.probes},
        "xids": [{"xid": r.xid, "class": r.effect, "reason": r.meaning, "source": r.source}
                 for r in effective_xids(cfg)],
        "quiet_periods_s": _quiet_periods(cfg),
        "recovery_action": cfg.health_recovery_action,
        "nvml_timeout_s": cfg.health_nvml_timeout,
    }


def policy_text(cfg: Config) -> str:
    switches = check_switches(cfg.disable_healthchecks, cfg.enable_healthchecks, XidTable(cfg.xid_overrides).ignored())
    lines = []
    if not switches.events and not switches.probes:
        lines.append("health checks are off (DP_DISABLE_HEALTHCHECKS=all): nothing below is acted on")
    lines += render_policy(effective_xids(cfg))
    fatal = cfg.health_fatal_quiet_period
    lines += [
        "",
        f"quiet period: transient {cfg.health_quiet_period:g} s; fatal "
        + ("never (only a GPU reset clears it)" if fatal is None else f"{fatal:g} s"),
        "recovery action: " + ("where the driver reports one, it decides the class (none: transient; "
                               "anything else: fatal)" if cfg.health_recovery_action else "not followed"),
        f"NVML deadline: {cfg.health_nvml_timeout:g} s per call",
    ]
    return "\n".join(lines)
