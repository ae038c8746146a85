"""Human and machine views of a node and its device tree (`nvdp devices`, the demo)."""

from __future__ import annotations

from typing import Any

from nvdp.core import mig
from nvdp.core.devices import DeviceTree, Node
from nvdp.core.resources import physical_id


def _resources_by_device(tree: DeviceTree) -> dict[str, list[str]]:
    """Physical device ID (GPU or MIG UUID) -> the resources it is advertised under."""
    found: dict[str, list[str]] = {}
    for name, resource in tree.items():
        for d in resource.devices:
            names = found.setdefault(physical_id(d.id), [])
            if name not in names:
                names.append(name)
    return found


def mig_rows(node: Node, tree: DeviceTree) -> list[dict[str, Any]]:
    """Every MIG device on the node, with its profile and the resources it lands in (none when
    the strategy is `none` or mixed skipped it)."""
    where = _resources_by_device(tree)
    return [
        {
            "uuid": m.uuid,
            "gpu": g.index,
            "slot": m.slot,
            "index": f"{g.index}:{m.slot}",
            "profile": str(profile),
            "gi_id": m.gi_id,
            "ci_id": m.ci_id,
            "memory_mib": m.memory_mb,
            "resources": where.get(m.uuid, []),
        }
        for g, m, profile in mig.profiles_on(node)
    ]


def devices_json(node: Node, tree: DeviceTree) -> dict[str, Any]:
    return {
        "driver_version": node.driver_version,
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "memory_mib": g.memory_bytes // 2**20,
                "compute_capability": g.compute_capability,
                "numa_node": g.numa_node,
                "pci_bus_id": g.pci_bus_id,
                "mig_enabled": g.mig_enabled,
            }
            for g in node.gpus
        ],
        "mig_devices": mig_rows(node, tree),
        "resources": {
            name: [
                {
                    "id": d.id,
                    "index": d.index,
                    "health": d.health.value,
                    "reason": d.reason,
                    "numa_node": d.numa_node,
                    "paths": list(d.paths),
                }
                for d in resource.devices
            ]
            for name, resource in tree.items()
        },
    }


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def devices_table(node: Node, tree: DeviceTree) -> str:
    gpus = {g.uuid: g for g in node.gpus}
    rows = [["RESOURCE", "ID", "INDEX", "HEALTH", "NUMA", "GPU", "MEMORY"]]
    for name, resource in tree.items():
        for d in resource.devices:
            gpu = gpus.get(d.gpu_uuid)
            health = d.health.value + (f" ({d.reason})" if d.reason else "")
            if d.mig is not None:
                memory = f"{d.mig.memory_mb} MiB"
            else:
                memory = f"{gpu.memory_bytes // 2**20} MiB" if gpu else "?"
            rows.append([
                name,
                d.id,
                d.index,
                health,
                "-" if d.numa_node is None else str(d.numa_node),
                gpu.name if gpu else "?",
                memory,
            ])
    text = table(rows)
    migs = mig_rows(node, tree)
    if migs:
        mig_table = [["MIG DEVICE", "INDEX", "PROFILE", "GI", "CI", "MEMORY", "RESOURCE"]]
        mig_table += [
            [m["uuid"], m["index"], m["profile"], str(m["gi_id"]), str(m["ci_id"]), f"{m['memory_mib']} MiB",
             ", ".join(m["resources"]) or "- (not advertised)"]
            for m in migs
        ]
        text += "\n\n" + table(mig_table)
    return text
