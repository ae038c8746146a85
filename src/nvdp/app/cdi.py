"""Keep the CDI spec files in step with what the plugin serves.

`Plugin._serve` calls `refresh` every time a discovered node becomes the served tree (start-up,
SIGHUP, a changed MIG layout), before the resources are registered, so the names the first
Allocate answer carries are already defined. Nothing here stops the plugin: a spec that cannot be
generated or written is logged (and `nvdp doctor` fails its cdi-specs check), the plugin keeps
serving and Allocate keeps carrying the names.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nvdp.config.options import Config
from nvdp.core.container import CDI_VENDOR, uses_cdi
from nvdp.core.devices import Node
from nvdp.errors import CdiSpecError

if TYPE_CHECKING:
    from nvdp.backends.base import GpuBackend
    from nvdp.backends.driver_root import Roots
    from nvdp.backends.spec_files import Written
    from nvdp.core.cdi import Spec, SpecSet

# The spec builder, the driver-root scan and the file writer (with tempfile and shutil) are
# imported where they are used: a plugin without a cdi-* strategy never loads them.

log = logging.getLogger("nvdp.cdi")


def roots(cfg: Config, backend: GpuBackend | None, node: Node) -> Roots:
    """The simulated node's own roots, or the layout the flags describe."""
    from nvdp.backends.driver_root import DriverRootSource, roots_for

    if isinstance(backend, DriverRootSource):
        return backend.driver_roots(node)
    return roots_for(cfg)


def generate(cfg: Config, node: Node, backend: GpuBackend | None, vendor: str = CDI_VENDOR) -> SpecSet:
    """Scan the driver root and build every spec for this node and config (raises CdiSpecError)."""
    from nvdp.backends.driver_root import scan
    from nvdp.core.cdi import SpecSettings, build_specs

    where = roots(cfg, backend, node)
    settings = SpecSettings.from_config(cfg, driver_root=where.host_driver, dev_root=where.host_dev, vendor=vendor)
    facts = scan(where, node, settings.features, settings.imex_channel_ids, settings.feature_flags)
    return build_specs(node, facts, settings)


def write(folder: str, specs: SpecSet, vendor: str = CDI_VENDOR) -> Written:
    from nvdp.backends.spec_files import sync_folder
    from nvdp.core.cdi import CLASSES, file_name, to_json

    files = [(s.file_name(), to_json(s.doc)) for s in specs.specs]
    return sync_folder(folder, files, [file_name(vendor, c) for c in CLASSES])


@dataclass
class SpecPublisher:
    """Writes the specs on every change; remembers nothing but what to say."""

    last_error: str | None = None

    def refresh(self, cfg: Config, node: Node, backend: GpuBackend | None) -> frozenset[str] | None:
        """The CDI classes whose specs are on disk now, or None when nvdp wrote none (no cdi-*
        strategy, writing off, or it failed: Allocate then names every enabled feature)."""
        if not uses_cdi(cfg):
            return None
        from nvdp.core.cdi import GPU_CLASS, file_name

        target = os.path.join(cfg.cdi_spec_dir or "/var/run/cdi", file_name(CDI_VENDOR, GPU_CLASS))
        if not cfg.cdi_spec_dir:
            self._missing(target, "--cdi-spec-dir is empty, so nvdp writes no CDI spec")
            return None
        try:
            specs = generate(cfg, node, backend)
            done = write(cfg.cdi_spec_dir, specs)
        except (CdiSpecError, OSError) as exc:  # OSError: a driver root that changes while it is read
            self.last_error = str(exc)
            log.error("CDI spec not written", extra={"error": str(exc)})
            self._missing(target, "it could not be written")
            return None
        self.last_error = None
        for note in specs.notes:
            log.warning(note)
        gpu = specs.specs[0]
        for path in done.written:
            log.info("CDI spec written", extra={"path": path, "devices": len(_spec_at(specs, path).device_names)})
        for path in done.removed:
            log.info("CDI spec removed (its class is off or empty)", extra={"path": path})
        if not done.written:
            log.debug("CDI specs unchanged", extra={"folder": cfg.cdi_spec_dir, "devices": len(gpu.device_names)})
        return specs.classes

    @staticmethod
    def _missing(target: str, why: str) -> None:
        log.warning(f"CDI spec {target} is not written by nvdp ({why}): the container runtime cannot resolve "
                    "the k8s.device-plugin.nvidia.com/gpu=<id> names Allocate returns unless that spec exists",
                    extra={"path": target})


def _spec_at(specs: SpecSet, path: str) -> Spec:
    name = os.path.basename(path)
    return next(s for s in specs.specs if s.file_name() == name)
