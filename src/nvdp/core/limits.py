"""The size of a resource's ListAndWatch message, worked out from the devices without building
it, so a device list the kubelet would refuse (over its 4 MiB receive limit) is refused when the
tree is planned, naming the resource, before a million replicas are even built.

The arithmetic is protobuf's wire format for `ListAndWatchResponse{repeated Device devices = 1}`
with `Device{string ID = 1; string health = 2; TopologyInfo topology = 3}`; a unit test checks it
against protobuf's own ByteSize.
"""

from __future__ import annotations

from collections.abc import Iterable

from nvdp.config.inputs import KUBELET_MAX_MESSAGE_BYTES
from nvdp.core.devices import Device, Health
from nvdp.errors import ConfigError

__all__ = ["KUBELET_MAX_MESSAGE_BYTES", "check_list_size", "device_bytes", "list_bytes", "replicas_bytes"]


def _varint(value: int) -> int:
    """Bytes of a protobuf varint (negative int64 values take 10)."""
    if value < 0:
        return 10
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def _field(body: int) -> int:
    """A length-delimited field: tag, length, body."""
    return 1 + _varint(body) + body


def device_bytes(id_bytes: int, health: Health, numa_node: int | None) -> int:
    """One device's share of the list: its entry in `devices` (the wire health strings are the
    `Health` values, "Healthy" / "Unhealthy")."""
    body = _field(id_bytes) if id_bytes else 0
    body += _field(len(health.value))
    if numa_node is not None:  # TopologyInfo{nodes: [NUMANode{ID}]}; ID 0 is not written (proto3)
        numa = 1 + _varint(numa_node) if numa_node else 0
        body += _field(_field(numa))
    return _field(body)


def list_bytes(devices: Iterable[Device]) -> int:
    return sum(device_bytes(len(d.id.encode()), d.health, d.numa_node) for d in devices)


def replicas_bytes(device: Device, replicas: int) -> int:
    """The list share of `device`'s replicas `<id>::0` .. `<id>::<replicas-1>`, without building them."""
    base = len(device.id.encode()) + 2
    total, digits, low = 0, 1, 0
    while low < replicas:
        high = min(replicas, 10**digits)  # the numbers written with `digits` digits: [low, high)
        total += (high - low) * device_bytes(base + digits, device.health, device.numa_node)
        low, digits = high, digits + 1
    return total


def check_list_size(resource: str, devices: int, size: int) -> None:
    """Refuse a device list the kubelet would reject: nothing of it would ever be scheduled."""
    if size > KUBELET_MAX_MESSAGE_BYTES:
        raise ConfigError(
            f"resource {resource}",
            f"{devices} devices make a ListAndWatch message of {size} bytes, over the kubelet's limit of "
            f"{KUBELET_MAX_MESSAGE_BYTES} bytes (4 MiB); lower the time-slicing replicas "
            f"(sharing.timeSlicing.resources)",
        )
