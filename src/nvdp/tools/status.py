"""`nvdp status`: a running plugin's view (devices, health with reasons, registrations), read from
its /metrics endpoint and shown as tables or JSON."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from nvdp.config.load import parse_listen_address
from nvdp.errors import PluginError
from nvdp.ops import metrics as m
from nvdp.tools.report import table


class StatusError(PluginError):
    """The metrics endpoint could not be read."""


@dataclass
class ResourceStatus:
    name: str
    registered: bool = False
    streams: int = 0
    devices: int = 0
    healthy: int = 0
    allocations: int = 0
    allocation_errors: int = 0


@dataclass
class DeviceStatus:
    resource: str
    device: str
    gpu_uuid: str
    healthy: bool
    reason: str


@dataclass
class Status:
    version: str = ""
    backend: str = ""
    driver_version: str = ""
    init_failed: bool = False
    registrations: int = 0
    kubelet_restarts: int = 0
    resources: dict[str, ResourceStatus] = field(default_factory=dict)
    devices: list[DeviceStatus] = field(default_factory=list)
    xid_events: dict[str, int] = field(default_factory=dict)  # "GPU-...: XID n" -> count

    def to_json(self) -> dict[str, Any]:
        view = asdict(self)
        view["resources"] = list(view["resources"].values())
        return view


def metrics_url(address: str) -> str:
    """HOST:PORT (as given to --metrics-address) or a URL -> the /metrics URL to read."""
    if address.startswith(("http://", "https://")):
        return address if address.rstrip("/").endswith("/metrics") else address.rstrip("/") + "/metrics"
    host, port = parse_listen_address(address, "--address")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"


def fetch(url: str, timeout: float = 5.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bytes(response.read()).decode()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot read {url}: {reason} (is the plugin running with --metrics-address?)") from exc


def parse(text: str) -> Status:
    status = Status()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, sample.value
            resource = labels.get("resource", "")
            # Counters are exposed as <family>_total; the constants name the family.
            match sample.name.removesuffix("_total"):
                case m.BUILD_INFO:
                    status.version = labels.get("version", "")
                case m.NODE_INFO:
                    status.backend, status.driver_version = labels["backend"], labels["driver_version"]
                case m.INIT_FAILED:
                    status.init_failed = value == 1
                case m.REGISTRATIONS:
                    status.registrations = int(value)
                case m.KUBELET_RESTARTS:
                    status.kubelet_restarts = int(value)
                case m.RESOURCE_REGISTERED:
                    _resource(status, resource).registered = value == 1
                case m.STREAMS:
                    _resource(status, resource).streams = int(value)
                case m.ALLOCATIONS:
                    _resource(status, resource).allocations = int(value)
                case m.ALLOCATION_ERRORS:
                    _resource(status, resource).allocation_errors += int(value)
                case m.XID_EVENTS:
                    status.xid_events[f"{labels['gpu_uuid']}: XID {labels['xid']}"] = int(value)
                case m.DEVICE_HEALTHY:
                    device = DeviceStatus(resource, labels["device"], labels["gpu_uuid"], value == 1, labels["reason"])
                    status.devices.append(device)
                    summary = _resource(status, resource)
                    summary.devices += 1
                    summary.healthy += int(device.healthy)
    return status


def _resource(status: Status, name: str) -> ResourceStatus:
    return status.resources.setdefault(name, ResourceStatus(name))


def render(status: Status) -> str:
    head = f"nvdp {status.version or '?'}  backend={status.backend or '-'}  driver={status.driver_version or '-'}"
    head += f"  registrations={status.registrations}  kubelet-restarts={status.kubelet_restarts}"
    parts = [head]
    if status.init_failed:
        parts.append("initialisation FAILED: the plugin idles (fail-on-init-error=false); see its log")
    if status.resources:
        rows = [["RESOURCE", "REGISTERED", "STREAMS", "HEALTHY", "ALLOCATIONS", "ERRORS"]]
        for r in status.resources.values():
            rows.append([r.name, "yes" if r.registered else "NO", str(r.streams), f"{r.healthy}/{r.devices}",
                         str(r.allocations), str(r.allocation_errors)])
        parts.append(table(rows))
    if status.devices:
        # The GPU column only where a device is not a whole GPU (replicas, MIG devices).
        with_gpu = any(d.gpu_uuid != d.device for d in status.devices)
        rows = [["RESOURCE", "DEVICE", *(["GPU"] if with_gpu else []), "HEALTH", "REASON"]]
        for d in status.devices:
            rows.append([d.resource, d.device, *([d.gpu_uuid] if with_gpu else []),
                         "Healthy" if d.healthy else "Unhealthy", d.reason])
        parts.append(table(rows))
    if status.xid_events:
        parts.append(table([["XID EVENTS", "COUNT"], *([k, str(v)] for k, v in sorted(status.xid_events.items()))]))
    return "\n\n".join(parts)
