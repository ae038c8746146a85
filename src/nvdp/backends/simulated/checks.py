"""The checks a simulated node must pass, whether it comes from a YAML profile (through the
schema, profile.py and expand.py) or from a precompiled built-in one (builtin.py): kept here, in
a module that needs neither PyYAML nor pydantic, so the built-in path runs them too."""

from __future__ import annotations

import re
from collections.abc import Sequence

from nvdp.core.devices import GpuInfo

# A PCI address as NVML writes it: domain (8 hex digits; 4 also accepted), bus, device (< 0x20), function.
PCI_BUS_ID = re.compile(r"(?:[0-9A-Fa-f]{4}){1,2}:[0-9A-Fa-f]{2}:[01][0-9A-Fa-f]\.[0-7]")


def first_clash(gpus: Sequence[GpuInfo], wheres: Sequence[str]) -> tuple[str, str] | None:
    """Every GPU and MIG device must have its own UUID and every GPU its own PCI bus id, as on a
    real node (the kubelet would see two devices with one ID; topology and health key on both).
    `wheres[i]` names the entry GPU i came from. The first clash as (field path, what is wrong)."""
    uuids: dict[str, str] = {}
    buses: dict[str, str] = {}
    owners: list[tuple[str, dict[str, str], str, str]] = []
    for gpu, where in zip(gpus, wheres, strict=True):
        owners += [(gpu.uuid, uuids, f"{where}.uuid", where),
                   (gpu.pci_bus_id.upper(), buses, f"{where}.pci_bus_id", where)]
    for gpu, where in zip(gpus, wheres, strict=True):
        owners += [(d.uuid, uuids, f"{where}.mig.devices.{n}.uuid", f"{where}.mig.devices.{n}")
                   for n, d in enumerate(gpu.mig_devices)]
    for value, seen, path, owner in owners:
        what = path.rsplit(".", 1)[1]
        if value in seen:
            return path, f"{value!r} is also the {what} of {seen[value]}; every device needs its own"
        seen[value] = owner
    return None
