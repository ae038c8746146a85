"""The exceptions nvdp raises, by meaning rather than by library.

    PluginError
    ├── ConfigError            a flag, env var or config-file field is invalid (names the field)
    ├── DiscoveryError         the GPUs could not be enumerated
    │   ├── NvmlUnavailable    libnvidia-ml could not be loaded or initialised (lists the paths tried)
    │   ├── NoDevicesFound     NVML works but there is nothing to advertise
    │   └── MigConfigError     the MIG layout does not fit the MIG strategy (`single`)
    ├── DeviceError            one device misbehaved at run time (NVML call failed, GPU lost)
    ├── EventWaitError         waiting for GPU health events failed (retried with back-off)
    ├── AllocationError        a kubelet request cannot be honoured
    │   ├── UnknownDevice      an ID the resource does not advertise
    │   └── UnhealthyDevice    an ID that is currently Unhealthy
    ├── RegistrationError      the kubelet refused or did not answer Register
    ├── ServeError             a resource's socket could not be bound (folder missing or read-only)
    ├── ListenError            the metrics/probe listener could not be opened (address in use...)
    ├── CdiSpecError           a CDI spec could not be generated or written (names the path)
    ├── MpsError               an MPS program (control daemon, nvidia-smi, mount) failed or did not answer
    ├── LabelError             GPU feature discovery cannot label this node (MPS on a MIG GPU...)
    ├── KubeError              talking to the Kubernetes API failed
    │   ├── KubeConfigError    no usable in-cluster or kubeconfig settings (also a ConfigError)
    │   ├── KubeUnavailable    the API server could not be reached, or the connection dropped
    │   └── KubeApiError       the API server answered with an error Status (code, reason)
    │       └── ResourceExpired    410 Gone: the resourceVersion is too old; list again
    └── NodeConfigError        config-manager: the config folder or the destination link is unusable

Foreign errors (pynvml's NVMLError, grpc.RpcError, lightkube's and httpx's errors, OSError) are
translated where they enter (`backends/nvml/seam.py`, `kubelet/registration.py`, `backends/mps.py`,
`kube/client.py`) and re-raised `from` the original.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pydantic is imported only where a file is validated (start-up time)
    from pydantic import ValidationError


class PluginError(Exception):
    """Base of every error nvdp raises on purpose."""


class ConfigError(PluginError):
    """An invalid configuration value; the message names the flag or field and what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid {field}: {message}")
        self.field = field


def config_error_from(exc: ValidationError, field: Callable[[str], str]) -> ConfigError:
    """The first pydantic error as a ConfigError in our words (never pydantic's own: "Input
    should be a valid dictionary or instance of Profile" means nothing to an operator).
    `field(dotted path)` names the field; the path is "" for the document itself."""
    first = exc.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    return ConfigError(field(path), _in_our_words(first["type"], first.get("input"), first.get("ctx") or {},
                                                  first["msg"]))


def field_in(where: str) -> Callable[[str], str]:
    """Names a field the way profile errors do: `simulated profile dgx-h100 field gpus.0.count`."""
    return lambda path: f"{where} field {path}" if path else where


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _in_our_words(kind: str, given: object, ctx: Mapping[str, Any], msg: str) -> str:
    value = _shown(given)
    words = {
        "missing": "required, but not given",
        "extra_forbidden": "unknown field (check the spelling)",
        "bool_type": f"{value} is not a boolean (true or false, without quotes)",
        "bool_parsing": f"{value} is not a boolean (true or false, without quotes)",
        "int_type": f"{value} is not an integer",
        "int_parsing": f"{value} is not an integer",
        "int_from_float": f"{value} is not an integer",
        "float_type": f"{value} is not a number",
        "float_parsing": f"{value} is not a number",
        "string_type": f"{value} is not a string",
        "list_type": f"{value} is not a list",
        "tuple_type": f"{value} is not a list",
        "dict_type": f"{value} is not a mapping (key: value)",
        "model_type": f"{value} is not a mapping (key: value)",
        "model_attributes_type": f"{value} is not a mapping (key: value)",
        "greater_than": f"{value} must be > {ctx.get('gt')}",
        "greater_than_equal": f"{value} must be >= {ctx.get('ge')}",
        "less_than": f"{value} must be < {ctx.get('lt')}",
        "less_than_equal": f"{value} must be <= {ctx.get('le')}",
        "too_short": f"{value} needs at least {ctx.get('min_length')} items",
        "too_long": f"{value} takes at most {ctx.get('max_length')} items",
        "literal_error": f"{value} is not one of {ctx.get('expected')}",
    }
    if kind in words:
        return words[kind]
    if kind in ("value_error", "assertion_error"):  # our validators' own text, as written
        return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"{value} is not valid here"


class DiscoveryError(PluginError):
    """GPU discovery failed."""


class NvmlUnavailable(DiscoveryError):
    """NVML could not be loaded or initialised."""

    def __init__(self, message: str, searched: tuple[str, ...] = ()) -> None:
        detail = f"{message}; searched: {', '.join(searched)}" if searched else message
        super().__init__(detail)
        self.searched = searched


class NoDevicesFound(DiscoveryError):
    """NVML answered but reported no usable device."""


class MigConfigError(DiscoveryError):
    """The node's MIG layout cannot be served with the configured --mig-strategy."""


class DeviceError(PluginError):
    """A run-time failure of one GPU (an NVML call failed, the GPU fell off the bus)."""

    def __init__(self, gpu: str, message: str) -> None:
        super().__init__(f"GPU {gpu}: {message}")
        self.gpu = gpu


class EventWaitError(PluginError):
    """The health event wait failed (not a timeout): NVML is wedged or the event set is gone."""


class AllocationError(PluginError):
    """A request from the kubelet that cannot be honoured."""


MAX_ID_SHOWN = 128


def shown_id(device_id: str) -> str:
    """A device ID as an error message shows it: unchanged when short and printable; otherwise
    quoted (no control characters in a log line) and cut (gRPC status details must stay well
    under the 16 KiB metadata limit, or the caller gets RESOURCE_EXHAUSTED instead of our error)."""
    if len(device_id) <= MAX_ID_SHOWN and device_id.isprintable():
        return device_id
    if len(device_id) <= MAX_ID_SHOWN:
        return repr(device_id)
    return f"{device_id[:MAX_ID_SHOWN]!r}... ({len(device_id)} characters)"


def invalid_request(resource: str, detail: str) -> str:
    """An Allocate refusal worded as the official plugin's (`rm.ValidateRequest`), so logs and
    alerts written for it keep matching."""
    return f'invalid allocation request for "{resource}": invalid request: {detail}'


class UnknownDevice(AllocationError):
    def __init__(self, resource: str, device_id: str) -> None:
        super().__init__(invalid_request(resource, f"unknown device: {shown_id(device_id)}"))
        self.resource = resource
        self.device_id = device_id


class UnhealthyDevice(AllocationError):
    """nvdp only: the official plugin hands out unhealthy devices."""

    def __init__(self, resource: str, device_id: str, reason: str = "") -> None:
        why = f" ({reason})" if reason else ""
        super().__init__(invalid_request(resource, f"unhealthy device: {shown_id(device_id)}{why}"))
        self.resource = resource
        self.device_id = device_id


class RegistrationError(PluginError):
    """The kubelet refused our Register call, or did not answer in time."""


class ServeError(PluginError):
    """A resource server could not bind its unix socket; the message names the path."""


class ListenError(PluginError):
    """The operations listener (--metrics-address) could not be opened."""


class CdiSpecError(PluginError):
    """A CDI spec could not be built (driver root without libraries, unreadable ld cache) or
    written (spec folder not writable); the message names the path."""


class MpsError(PluginError):
    """An MPS program failed, could not be run, or did not answer in time; the message says which and why."""


class LabelError(PluginError):
    """GPU feature discovery cannot compute or publish the labels (e.g. MPS sharing configured on
    a node with a MIG-enabled GPU, a driver version NVML gave in an unknown format)."""


class KubeError(PluginError):
    """A call to the Kubernetes API failed."""


class KubeConfigError(ConfigError, KubeError):
    """No usable connection settings: names the env var or file that is missing or bad (a
    ConfigError too, so the CLI exits 2 before doing anything)."""


class KubeUnavailable(KubeError):
    """The API server could not be reached, timed out, or dropped the connection (retried with back-off)."""


class KubeApiError(KubeError):
    """The API server answered with an error `Status`: its HTTP code, reason (NotFound, Forbidden...)
    and message."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}" if reason else f"{code}: {message}")
        self.code = code
        self.reason = reason
        self.message = message


class ResourceExpired(KubeApiError):
    """410 Gone (reason Expired): the resourceVersion asked for is older than the server keeps."""


class NodeConfigError(PluginError):
    """config-manager: the folder of configs or the destination link cannot be used; names the path."""
