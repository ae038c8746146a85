"""What is checked before the plugin opens anything (a ConfigError here is exit 2, with nothing
touched), and the warning a simulated node starts with.

Simulate mode (docs/simulated-profiles.md, "Simulate mode on a node"): it advertises fake GPUs,
so it is never switched on by accident. It comes only from the command line or the environment
(the config file's keys are refused at load); with the kubelet's own socket (the default
--kubelet-socket) it also needs --simulate-on-real-kubelet; and it always starts with a WARNING
and shows as `simulated="true"` on nvdp_build_info.
"""

from __future__ import annotations

import logging
import os

from nvdp.config.options import OPTIONS_BY_FIELD, Config
from nvdp.errors import ConfigError

log = logging.getLogger("nvdp.app")  # stable name: operators filter on it

REAL_KUBELET_SOCKET: str = OPTIONS_BY_FIELD["kubelet_socket"].default


def on_real_kubelet(cfg: Config) -> bool:
    """Whether the plugin would register with the node's kubelet (its socket is the default path)."""
    return bool(cfg.kubelet_socket) and os.path.normpath(cfg.kubelet_socket) == os.path.normpath(REAL_KUBELET_SOCKET)


def check(cfg: Config) -> None:
    """Raises ConfigError for a serving configuration that must not start."""
    if cfg.simulate and on_real_kubelet(cfg) and not cfg.simulate_on_real_kubelet:
        raise ConfigError("--simulate", (
            f"a simulated node would advertise fake GPUs to this node's kubelet ({cfg.kubelet_socket}); "
            "give --kubelet-socket of a test kubelet, an empty --kubelet-socket to serve without registering, "
            "or --simulate-on-real-kubelet if that is what you want"))
    if cfg.simulate_control:
        from nvdp.backends.simulated.control import FLAG, path_problem

        problem = path_problem(cfg.simulate_control, cfg.kubelet_socket)
        if problem is not None:
            raise ConfigError(FLAG, problem)


def announce(cfg: Config) -> None:
    """The banner of a simulated node: nobody should mistake it for a real one."""
    if not cfg.simulate:
        return
    where = ("the node's own kubelet (--simulate-on-real-kubelet): pods may be scheduled onto GPUs that do not exist"
             if on_real_kubelet(cfg) else f"kubelet socket {cfg.kubelet_socket or '(none: not registering)'}")
    log.warning("SIMULATED NODE: the GPUs advertised are fake (--simulate %s), to %s", cfg.simulate, where,
                extra={"simulate": cfg.simulate, "fault_injection": cfg.simulate_control or "-"})
    if cfg.simulate_control:
        log.warning("fault injection is open to anyone who can connect to %s (no authentication)",
                    cfg.simulate_control)
