"""docs/labels.md cannot drift: its option table is the code's, and every label GFD can write on
the built-in simulated nodes (any strategy, shared or not, fabric and vGPU facts) is listed."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from nvdp.backends.simulated.expand import build_node
from nvdp.backends.simulated.profile import builtin_profiles, load_profile
from nvdp.config.options import GFD_OPTIONS, Config, SharedResource, options_markdown
from nvdp.core.devices import FabricInfo, VgpuInfo
from nvdp.core.labels import SharingView, node_labels

DOC = (Path(__file__).parents[2] / "docs" / "labels.md").read_text()
MIXED_KEY = re.compile(r"nvidia\.com/mig-[^.]+(?:\.[0-9]+gb)?(?:\.me(?:\.all)?|\.gfx)?\.(.+)")


def test_the_option_table_is_the_codes() -> None:
    assert options_markdown(GFD_OPTIONS) in DOC, (
        "docs/labels.md's option table is stale; replace it with the output of\n"
        "  python -c 'from nvdp.config.options import GFD_OPTIONS, options_markdown; "
        "print(options_markdown(GFD_OPTIONS))'"
    )


def documented() -> set[str]:
    """Label keys named in the doc's table: `gpu.memory`, and `.minor` after `cuda.driver-version.major`."""
    names: set[str] = set()
    for row in re.findall(r"^\| (`[^|]+)\|", DOC, flags=re.MULTILINE):
        base = ""
        for name in re.findall(r"`([^`]+)`", row):
            if name.startswith("."):
                names.add(base + name)
            else:
                names.add(name)
                base = name.rsplit(".", 1)[0]
    return names


def every_label() -> set[str]:
    keys: set[str] = set()
    shared = SharingView("time-slicing", (SharedResource("nvidia.com/gpu", 2),))
    for profile in builtin_profiles():
        node = build_node(*load_profile(profile))
        extra = replace(node, gpus=tuple(replace(g, fabric=FabricInfo("b2c1a3e5-0000-4000-8000-000000000001", 1),
                                                 vgpu=VgpuInfo("550.1", "r550_00")) for g in node.gpus))
        for strategy in ("none", "single", "mixed"):
            for sharing in (None, shared):
                cfg = Config(mig_strategy=strategy)
                keys |= set(node_labels(node, cfg, "x", 1700000000, sharing).labels)
                keys |= set(node_labels(extra, cfg, "x", 1700000000, sharing).labels)
    return keys


def test_every_label_is_documented() -> None:
    names = documented()
    missing = []
    for key in sorted(every_label()):
        short = key.removeprefix("nvidia.com/")
        mixed = MIXED_KEY.fullmatch(key)
        listed = f"mig-<profile>.{mixed.group(1)}" in names if mixed else short in names
        if not listed:
            missing.append(key)
    assert missing == []


def test_the_doc_check_can_fail() -> None:
    assert "gpu.memory" in documented() and "cuda.driver-version.revision" in documented()
    assert "mig-<profile>.engines.ofa" in documented()
    assert "gpu.unlisted" not in documented()
