"""The CDI part of `nvdp demo --device-list-strategy cdi-cri` (or cdi-annotations): the names the
Allocate answer carries, and the spec the plugin wrote for them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from nvdp.core.cdi import file_name
from nvdp.core.container import CDI_VENDOR

Say = Callable[[str], None]
SHOWN = 6  # devices listed before "... and N more"


def cdi_story(spec_dir: str, cdi_devices: list[str], annotations: dict[str, str], say: Say) -> None:
    names = cdi_devices or [n for value in annotations.values() for n in value.split(",")]
    say("kubelet: Allocate -> CDI devices " + (", ".join(names) or "(none)"))
    path = os.path.join(spec_dir, file_name(CDI_VENDOR, "gpu"))
    try:
        with open(path, encoding="utf-8") as f:
            spec: dict[str, Any] = json.load(f)
    except (OSError, ValueError) as exc:
        say(f"cdi: no spec at {path} ({exc}); the runtime could not resolve these names")
        return
    devices = [d["name"] for d in spec["devices"]]
    edits = spec.get("containerEdits", {})
    say(f"cdi: {path} (cdiVersion {spec['cdiVersion']}, kind {spec['kind']}) defines {len(devices)} devices:")
    for name in devices[:SHOWN]:
        nodes = ", ".join(n["path"] for n in next(d for d in spec["devices"] if d["name"] == name)
                          ["containerEdits"]["deviceNodes"])
        say(f"    {name}: {nodes}")
    if len(devices) > SHOWN:
        say(f"    ... and {len(devices) - SHOWN} more")
    say(f"    common: {len(edits.get('deviceNodes', []))} control nodes, {len(edits.get('mounts', []))} mounts "
        f"(driver libraries, binaries, firmware), {len(edits.get('hooks', []))} hooks, env "
        + " ".join(edits.get("env", [])))
    unresolved = [n for n in names if n.startswith(f"{CDI_VENDOR}/gpu=") and n.split("=", 1)[1] not in devices]
    say("cdi: every gpu name of the answer is in the spec" if not unresolved
        else f"cdi: NOT in the spec: {', '.join(unresolved)}")
