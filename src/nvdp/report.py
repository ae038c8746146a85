"""Human and machine views of a node and its device tree (`nvdp devices`, the demo)."""

from __future__ import annotations

from typing import Any

from nvdp.devices import DeviceTree, Node


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
            rows.append([
                name,
                d.id,
                d.index,
                health,
                "-" if d.numa_node is None else str(d.numa_node),
                gpu.name if gpu else "?",
                f"{gpu.memory_bytes // 2**20} MiB" if gpu else "?",
            ])
    return table(rows)
