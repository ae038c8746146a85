"""Sharing (time-slicing and MPS): which devices of a resource are replicated, and under which name.

Unlike the official plugin, which parses `devices` and `rename` and then throws them away, nvdp
honours both: `devices` selects the GPUs (or MIG devices) that are shared, `rename` names the
resource their replicas are served under, and the devices not selected stay exclusive under
the resource's own name. The rules that depend on the node (a reference that does not exist,
overlapping selections, a rename that collides, an empty selection) are checked here, before
anything is served, and fail with a ConfigError naming the entry. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from nvdp.config.options import SharedResource, Sharing
from nvdp.core.devices import Device, Node
from nvdp.core.limits import check_list_size, replicas_bytes
from nvdp.errors import ConfigError

REPLICA_SEPARATOR = "::"


def field_of(entry: SharedResource, key: str) -> str:
    """How an error names the entry's field: `sharing.mps.resources.0.devices in /etc/nvdp/config.yaml`."""
    if not entry.where:
        return f"sharing of {entry.name} ({key})"
    return f"{entry.where}.{key} in {entry.source_file}" if entry.source_file else f"{entry.where}.{key}"


def replicas_of(device: Device, replicas: int) -> list[Device]:
    return [replace(device, id=f"{device.id}{REPLICA_SEPARATOR}{n}", replica=n) for n in range(replicas)]


def apply_sharing(
    groups: Mapping[str, Sequence[Device]], sharing: Sharing, node: Node | None = None
) -> dict[str, list[Device]]:
    """Replace each selected device of a shared resource by `replicas` copies `<id>::<n>`, served
    under the entry's target name; unselected devices stay where they were.

    Raises ConfigError naming the entry for a selection the node cannot satisfy."""
    existing = set(groups)
    claimed: dict[str, str] = {}  # device id -> the entry that shares it
    producers: dict[str, SharedResource] = {}  # target name -> the first entry serving it
    chosen: list[tuple[SharedResource, list[Device]]] = []
    for entry in sharing.resources:
        devices = list(groups.get(entry.name, ()))
        if entry.devices == "all" and not devices:
            continue  # the resource is not on this node (one config file serves many nodes)
        selected = select(entry, devices, node)
        for device in selected:
            if device.id in claimed:
                raise ConfigError(field_of(entry, "devices"),
                                  f"{_describe(device)} is already shared by {claimed[device.id]}")
            claimed[device.id] = entry.where or entry.name
        _check_target(entry, existing, producers)
        # Measured before building: a list the kubelet would refuse is refused without first
        # building millions of copies.
        check_list_size(entry.target, len(selected) * entry.replicas,
                        sum(replicas_bytes(d, entry.replicas) for d in selected))
        chosen.append((entry, selected))

    result = {name: list(devices) for name, devices in groups.items()}
    for entry, selected in chosen:
        ids = {d.id for d in selected}
        if entry.target == entry.name:  # in place: each selected device becomes its replicas
            result[entry.name] = [r for d in result[entry.name]
                                  for r in (replicas_of(d, entry.replicas) if d.id in ids else [d])]
        else:
            result[entry.name] = [d for d in result[entry.name] if d.id not in ids]
            result.setdefault(entry.target, []).extend(r for d in selected for r in replicas_of(d, entry.replicas))
    return {name: devices for name, devices in result.items() if devices}


def _check_target(entry: SharedResource, existing: set[str], producers: dict[str, SharedResource]) -> None:
    target = entry.target
    if target != entry.name and target in existing:
        raise ConfigError(field_of(entry, "rename"),
                          f"{target} is already a resource on this node; choose another name")
    other = producers.setdefault(target, entry)
    if other.name != entry.name:
        raise ConfigError(field_of(entry, "rename"),
                          f"{target} is already served by {other.where or other.name} (replicas of {other.name})")


def select(entry: SharedResource, devices: Sequence[Device], node: Node | None = None) -> list[Device]:
    """The devices of the resource that `entry.devices` selects, in the resource's order."""
    wanted = entry.devices
    if wanted == "all":
        return list(devices)
    if isinstance(wanted, int):
        if wanted > len(devices):
            raise ConfigError(field_of(entry, "devices"),
                              f"requested {wanted} devices to be replicated, but only {len(devices)} devices "
                              f"available in {entry.name}")
        return list(devices[:wanted])
    if not wanted:
        raise ConfigError(field_of(entry, "devices"), f"the list selects no device of {entry.name}")
    matched: set[str] = set()
    for ref in wanted:
        hits = [d for d in devices if matches(d, ref)]
        if not hits:
            raise ConfigError(field_of(entry, "devices"), _why_unmatched(ref, entry.name, devices, node))
        matched.update(d.id for d in hits)
    return [d for d in devices if d.id in matched]


def matches(device: Device, ref: str) -> bool:
    """Whether a `devices` list item names this device: an index ("0", "0:1") or a UUID
    ("GPU-...", "MIG-...", or the legacy "MIG-GPU-<uuid>/<gi>/<ci>")."""
    if ref[0].isdigit():
        return device.index == ref
    if ref.startswith("MIG-GPU-") and "/" in ref:
        parent, _, rest = ref.removeprefix("MIG-").partition("/")
        gi, _, ci = rest.partition("/")
        return (device.mig is not None and device.gpu_uuid == parent
                and f"{device.mig.gi_id}/{device.mig.ci_id}" == f"{gi}/{ci}")
    return device.id == ref


def _on_node(ref: str, node: Node) -> bool:
    for gpu in node.gpus:
        if ref in (str(gpu.index), gpu.uuid):
            return True
        for m in gpu.mig_devices:
            if ref in (f"{gpu.index}:{m.slot}", m.uuid, f"MIG-{gpu.uuid}/{m.gi_id}/{m.ci_id}"):
                return True
    return False


def _why_unmatched(ref: str, resource: str, devices: Sequence[Device], node: Node | None) -> str:
    if node is not None and _on_node(ref, node):
        return f"{ref} is on this node but is not a device of {resource}"
    if ref[0].isdigit():
        return f"no matching device at index: {ref}"
    return f"no matching device with UUID: {ref}"


def _describe(device: Device) -> str:
    kind = "MIG device" if device.mig is not None else "GPU"
    return f"{kind} {device.index} ({device.id})"


def divergences(sharing: Sharing) -> list[str]:
    """Where nvdp serves something else than the official plugin would for this config: one line
    per entry whose `devices` or `rename` the official plugin drops (docs/sharing.md)."""
    lines = []
    for entry in sharing.resources:
        official = f"{entry.name}.shared" if entry.rename_by_default else entry.name
        honoured = []
        if entry.devices != "all":
            honoured.append(f"devices={_shown(entry.devices)}")
        if entry.target != official:
            honoured.append(f"rename={entry.target}")
        if honoured:
            lines.append(
                f"{entry.where or entry.name}: nvdp honours {' and '.join(honoured)}; the official plugin "
                f"ignores them and would share every device of {entry.name} as {official} (docs/sharing.md)"
            )
    return lines


def _shown(devices: object) -> str:
    return "[" + ", ".join(devices) + "]" if isinstance(devices, tuple) else str(devices)
