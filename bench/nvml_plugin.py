"""`python -m bench.nvml_plugin [FLAGS]`: `nvidia-device-plugin FLAGS` on the NVML path, with the
test fake (nvdp.testing.fake_nvml: 8 x H200 with NVLinks) answering for libnvidia-ml.

The flags and env vars go through the console script's own code (nvdp.cli: click, the config,
`_serve`); only the backend factory differs, so what is measured is the real NVML backend,
discovery, health checks and serving. pynvml is imported as on a node (its module's memory
counts), then not called: the fake stands in for it.
"""

from __future__ import annotations

import sys

import pynvml  # noqa: F401  (loaded for its weight, as on a node)

from nvdp import cli
from nvdp.backends.nvml.discovery import NvmlBackend
from nvdp.config.options import Config
from nvdp.testing.fake_nvml import h200_node


def fake_backend(cfg: Config) -> NvmlBackend:
    return NvmlBackend(driver_root=cfg.container_driver_root, nvml=h200_node())


def main(argv: list[str]) -> None:
    with cli.serve_main.make_context("nvidia-device-plugin", argv) as ctx:
        cli._serve(ctx.params, backend_factory=fake_backend)


if __name__ == "__main__":
    main(sys.argv[1:])
