"""From a Config to a served plan: open the backend it names, discover the node, plan the tree.

Three steps with one name each: `open_backend(cfg)` (which backend), `plan(node, cfg)` (the tree
to serve, with the allocation tables built), `discover(backend, cfg)` (both, refusing an empty
node); `discover_once(cfg)` opens, discovers and closes for one-shot commands (`nvdp devices`).
"""

from __future__ import annotations

from collections.abc import Callable

from nvdp.backends.base import GpuBackend
from nvdp.config.options import Config
from nvdp.core import allocation
from nvdp.core.devices import Node
from nvdp.core.resources import TreePlan, plan_tree
from nvdp.errors import DiscoveryError, NoDevicesFound

BackendFactory = Callable[[Config], GpuBackend]
# Config fields that need a new backend when they change (the rest only rebuild the tree).
# driver_root and dev_root only shape the device specs of Allocate (core/container.py), not discovery.
BACKEND_FIELDS = ("simulate", "container_driver_root", "device_discovery_strategy")


def open_backend(cfg: Config) -> GpuBackend:
    """The simulated backend when --simulate is set, real NVML otherwise."""
    if cfg.simulate:
        from nvdp.backends.simulated.backend import SimulatedBackend

        # --driver-root names where the simulated driver files go (CDI specs point there); default: a temp folder.
        return SimulatedBackend(cfg.simulate, driver_root=None if cfg.driver_root == "/" else cfg.driver_root,
                                source=cfg.source("simulate"))
    if cfg.device_discovery_strategy == "tegra":
        raise DiscoveryError("--device-discovery-strategy=tegra: Tegra (Jetson) discovery is not supported by nvdp")
    from nvdp.backends.nvml.discovery import NvmlBackend

    return NvmlBackend(driver_root=cfg.container_driver_root)


def check_inputs(cfg: Config) -> None:
    """The input checks that need more than the config itself, run before anything starts so
    that a mistake exits 2 with nothing opened: the simulated profile (read and expanded) and
    the fault-injection socket path. Raises ConfigError naming what the operator gave."""
    if cfg.simulate:
        from nvdp.backends.simulated.builtin import builtin_node, builtin_profiles

        if cfg.simulate in builtin_profiles():  # precompiled: read without YAML or the schema
            builtin_node(cfg.simulate, cfg.source("simulate"))
        else:
            from nvdp.backends.simulated.expand import build_node
            from nvdp.backends.simulated.profile import load_profile

            build_node(*load_profile(cfg.simulate, cfg.source("simulate")))
    if cfg.simulate_control:
        from nvdp.backends.simulated.control import check_socket_path

        check_socket_path(cfg.simulate_control, cfg.source("simulate_control"))


def needs_new_backend(old: Config, new: Config) -> bool:
    return any(getattr(old, f) != getattr(new, f) for f in BACKEND_FIELDS)


def plan(node: Node, cfg: Config) -> TreePlan:
    """The tree to serve for a node, with every resource's allocation tables built now, so the
    first GetPreferredAllocation is fast."""
    planned = plan_tree(node, cfg)
    for resource in planned.tree.values():
        allocation.prepare(resource, node.topology)
    return planned


def discover(backend: GpuBackend, cfg: Config) -> tuple[Node, TreePlan]:
    node = backend.discover()
    planned = plan(node, cfg)
    if not planned.tree:
        raise NoDevicesFound(f"no devices found by the {backend.name} backend")
    return node, planned


def discover_once(cfg: Config, backend_factory: BackendFactory = open_backend) -> tuple[Node, TreePlan]:
    """Open a backend, discover, close it (whether or not discovery worked): `nvdp devices`."""
    backend = backend_factory(cfg)
    try:
        return discover(backend, cfg)
    finally:
        backend.close()
