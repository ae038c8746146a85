"""The config file (schema v1): parsed with pydantic, imported only when a file is given.

The official plugin reads the file with encoding/json semantics: unknown keys are ignored, so
existing files keep loading; wrong types and unknown versions are errors naming the field.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from nvdp.config.inputs import KUBELET_MAX_MESSAGE_BYTES, MAX_DEVICES, InputFileError, check_size
from nvdp.config.options import (
    FILE_REFUSED,
    GFD_OPTIONS,
    OPTIONS,
    DeviceSelection,
    SharedResource,
    Sharing,
    XidClassName,
    XidOverride,
)
from nvdp.errors import ConfigError, config_error_from

log = logging.getLogger("nvdp.configfile")  # stable name: operators filter on it
# libyaml's parser when PyYAML has it (about 10x faster than the pure-Python one), same results.
YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _FileModel(BaseModel):
    # The official plugin ignores unknown keys (encoding/json); so do we, so existing files load.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


RESOURCE_PREFIX = "nvidia.com/"
MAX_RESOURCE_NAME = 63  # the kubelet's limit on a fully qualified resource name
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# A `devices` list item, as the official plugin accepts them: a GPU index ("0"), a MIG index
# ("0:1"), a GPU UUID, a MIG UUID or a MIG-GPU-<uuid>/<gi>/<ci> name.
_DEVICE_REF = re.compile(r"\d+|\d+:\d+|GPU-.+|MIG-.+")


def resource_name(text: str) -> str:
    """The official plugin's NewResourceName: add `nvidia.com/` when missing, then the full name
    must be at most 63 characters and the part after the first `/` a DNS-1123 subdomain (the
    kubelet refuses to register anything else)."""
    name = text if text.startswith(RESOURCE_PREFIX) else RESOURCE_PREFIX + text
    if len(name) > MAX_RESOURCE_NAME:
        raise ValueError(f"fully-qualified resource name must be {MAX_RESOURCE_NAME} characters or less: {name}")
    short = name.split("/", 1)[1]
    if len(short) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(short):
        raise ValueError(
            f"incorrect format for resource name {name!r}: after the '/' use lower-case letters, digits, "
            "'-' and '.', starting and ending with a letter or digit"
        )
    return name


def _check_devices(value: Any) -> Any:
    """`devices`: "all", a count > 0 or a list of device references (the official plugin's
    rules; nvdp then shares only the devices selected, see docs/sharing.md)."""
    if isinstance(value, str):
        if value != "all":
            raise ValueError(f"devices set as {value!r} but the only valid string input is 'all'")
    elif isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("a count of devices must be > 0")
    elif isinstance(value, list):
        for item in value:
            valid_int = isinstance(item, int) and not isinstance(item, bool) and item >= 0
            if not valid_int and not (isinstance(item, str) and _DEVICE_REF.fullmatch(item)):
                raise ValueError(f"unsupported type for device in devices list: {item!r}")
    else:
        raise ValueError(f"{value!r}: use 'all', a count of devices or a list of device indexes/UUIDs")
    return value


def _selection(value: Any) -> DeviceSelection:
    """The checked `devices` value as the core takes it: list items become strings ("0", "0:1")."""
    if isinstance(value, list):
        return tuple(str(item) for item in value)
    if value == "all":
        return "all"
    assert isinstance(value, int)  # _check_devices allows nothing else
    return value


class _ReplicatedResourceFile(_FileModel):
    # Optional only so that a missing key gets the official message instead of "Field required".
    name: str | None = Field(default=None, validate_default=True)
    replicas: StrictInt | None = Field(default=None, validate_default=True)
    rename: str | None = None
    devices: Any = "all"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str:
        if v is None:
            raise ValueError("no resource name specified")
        return resource_name(v)

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, v: int | None) -> int:
        if v is None:
            raise ValueError("no replicas specified")
        if v < 2:
            raise ValueError(f"number of replicas must be >= 2; found {v}")
        if v > MAX_DEVICES:  # refused here, before anything builds a million devices
            raise ValueError(f"{v} replicas can never be served: the replicas of even one device make a "
                             f"device list over the kubelet's {KUBELET_MAX_MESSAGE_BYTES}-byte (4 MiB) limit "
                             f"for ListAndWatch (at most {MAX_DEVICES} fit)")
        return v

    @field_validator("rename")
    @classmethod
    def _rename(cls, v: str | None) -> str | None:
        return None if v is None else resource_name(v)

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        return _check_devices(v)


class _SharingStrategyFile(_FileModel):
    # Strict, as upstream's encoding/json: "yes" or "true" (a string) is not a boolean.
    renameByDefault: StrictBool = False
    failRequestsGreaterThanOne: StrictBool | None = None
    resources: list[_ReplicatedResourceFile] = Field(default_factory=list, validate_default=True)

    @field_validator("resources")
    @classmethod
    def _some_resources(cls, v: list[_ReplicatedResourceFile]) -> list[_ReplicatedResourceFile]:
        if not v:
            raise ValueError("no resources specified")
        return v


class _SharingFile(_FileModel):
    timeSlicing: _SharingStrategyFile | None = None
    mps: _SharingStrategyFile | None = None


class _ConfigFile(_FileModel):
    version: str = "v1"
    flags: dict[str, Any] = Field(default_factory=dict)
    sharing: _SharingFile | None = None
    imex: dict[str, Any] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: str) -> str:
        if v != "v1":
            raise ValueError(f"unknown version: {v}")
        return v


def _struct_fields() -> dict[str, Any]:
    """The schema's struct fields as a tree of names, from the option tables plus the blocks."""
    tree: dict[str, Any] = {"version": {}, "flags": {}, "sharing": {"timeSlicing": {}, "mps": {}}, "imex": {}}
    # refused keys (FILE_REFUSED): found as the others, then refused with an error by load()
    keys = [*(opt.file_key for opt in (*OPTIONS, *GFD_OPTIONS) if opt.file_key), *FILE_REFUSED]
    for key in keys:
        node = tree
        for part in key.split("."):
            node = node.setdefault(part, {})
    return tree


_STRUCT_FIELDS = _struct_fields()


def canonical_keys(doc: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Match struct field names as Go's encoding/json does for the official plugin: an exact key
    wins, otherwise a key equal but for case (`Flags`, `migstrategy`) is taken for the field.
    Keys inside the sharing blocks are custom-decoded upstream and stay exact."""
    by_folded = {name.lower(): name for name in fields}
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = key if key in fields or not isinstance(key, str) else by_folded.get(key.lower(), key)
        if name in out and name != key:
            continue  # the exact key is present too: it wins
        sub = fields.get(name)  # empty for leaves and for the exact-keyed sharing blocks
        out[name] = canonical_keys(value, sub) if sub and isinstance(value, dict) else value
    return out


def read_config_file(
    path: str, read_text: Callable[[str], str], source: str = "--config-file"
) -> tuple[dict[str, Any], Sharing, tuple[XidOverride, ...]]:
    """Parse a config file into {dotted key: raw value} lookups, the sharing block and the XID
    policy overrides (`flags.nvdp.health.xids`). `source` is how the file was named
    (`--config-file` or `CONFIG_FILE`); errors about one field name the field and the file
    instead ("flags.migStrategy in /etc/nvdp/config.yaml")."""
    try:
        text = read_text(path)
        check_size(path, len(text.encode("utf-8", "surrogatepass")))  # also for injected readers
    except OSError as exc:
        raise ConfigError(source, f"error opening config file {path}: {exc.strerror or exc}") from exc
    except InputFileError as exc:
        raise ConfigError(source, str(exc)) from None
    try:
        doc = yaml.load(text, Loader=YAML_LOADER) or {}  # a safe loader (C or Python)
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"{path} is not valid YAML or JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(source, f"{path}: the top level must be a mapping")
    doc = canonical_keys(doc, _STRUCT_FIELDS)
    if "resources" in doc:
        log.warning("Customizing the 'resources' field is not yet supported in the config. Ignoring...")
    try:
        model = _ConfigFile.model_validate(doc)
    except ValidationError as exc:
        raise config_error_from(exc, lambda key: f"{key} in {path}" if key else path) from exc
    health = _health_block(doc)
    _fold_quiet_periods(health, path)
    return doc, _sharing_from(model.sharing, path), _xid_overrides(health.get("xids"), path)


# --- the XID policy (flags.nvdp.health; docs/health.md "XID policy in the config file") ---------

HEALTH_KEY = "flags.nvdp.health"


def _health_block(doc: dict[str, Any]) -> dict[str, Any]:
    node: Any = doc
    for part in ("flags", "nvdp", "health"):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _fold_quiet_periods(health: dict[str, Any], path: str) -> None:
    """`quietPeriods: {transient, fatal}`: `transient` is another spelling of `quietPeriod`
    (both in one file is an error), `fatal` is its own option; `ignored` has no quiet period."""
    periods = health.get("quietPeriods")
    if periods is None:
        return
    where = f"{HEALTH_KEY}.quietPeriods"
    if not isinstance(periods, dict):
        raise ConfigError(f"{where} in {path}", f"{periods!r} is not a mapping of class -> seconds (transient, fatal)")
    unknown = sorted(str(k) for k in periods if k not in ("transient", "fatal"))
    if unknown:
        why = "ignored XIDs raise no fault, so they have no quiet period" if unknown == ["ignored"] else (
            "the classes with a quiet period are transient and fatal")
        raise ConfigError(f"{where}.{unknown[0]} in {path}", why)
    if "transient" in periods:
        if "quietPeriod" in health:
            raise ConfigError(f"{where}.transient in {path}",
                              f"the same setting as {HEALTH_KEY}.quietPeriod: give one of them")
        health["quietPeriod"] = periods["transient"]


class _XidEntryFile(_FileModel):
    cls: XidClassName = Field(alias="class")
    reason: str = ""


def _entry_field(entry_key: str, path: str) -> Callable[[str], str]:
    return lambda field: f"{entry_key}.{field} in {path}" if field else f"{entry_key} in {path}"


def _xid_number(key: Any, where: str) -> int:
    if isinstance(key, bool) or not isinstance(key, int | str) or not str(key).strip().isdigit():
        raise ConfigError(where, f"{key!r} is not an XID number (a whole number >= 0)")
    return int(str(key).strip())


def _xid_overrides(raw: Any, path: str) -> tuple[XidOverride, ...]:
    """`xids: {79: {class: fatal, reason: ...}, 13: transient, ...}`: per XID a class (transient,
    fatal or ignored), as a mapping or the class name alone, and optionally the reason to show."""
    where = f"{HEALTH_KEY}.xids"
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} in {path}", f"{raw!r} is not a mapping of XID -> {{class, reason}}")
    overrides: dict[int, XidOverride] = {}
    for key, value in raw.items():
        entry_key = f"{where}.{key}"
        xid = _xid_number(key, f"{entry_key} in {path}")
        entry = {"class": value} if isinstance(value, str) else value
        try:
            parsed = _XidEntryFile.model_validate(entry)
        except ValidationError as exc:
            raise config_error_from(exc, _entry_field(entry_key, path)) from exc
        if xid in overrides:
            raise ConfigError(f"{entry_key} in {path}", f"XID {xid} is listed twice")
        overrides[xid] = XidOverride(xid, parsed.cls, parsed.reason.strip())
    return tuple(overrides[x] for x in sorted(overrides))


def _sharing_from(block: _SharingFile | None, path: str) -> Sharing:
    if block is None or (block.timeSlicing is None and block.mps is None):
        return Sharing()
    mps = block.mps is not None
    if mps and block.timeSlicing is not None:
        log.warning("sharing.timeSlicing is ignored: sharing.mps is set too, and MPS wins (as in the official plugin)")
    chosen = block.mps if block.mps is not None else block.timeSlicing
    assert chosen is not None  # one of the two blocks is set
    kind = "mps" if mps else "timeSlicing"
    resources = []
    for i, r in enumerate(chosen.resources):
        assert r.name is not None and r.replicas is not None  # the validators reject None
        where = f"sharing.{kind}.resources.{i}"
        # renameByDefault names every entry without its own `rename` `<name>.shared`. Unlike the
        # official plugin (DisableResourceNamingInConfig), an explicit `rename` and `devices` are
        # honoured: the plugin warns once at start when that changes what is served.
        rename = r.rename
        if rename is None and chosen.renameByDefault:
            rename = f"{r.name}.shared"
            if len(rename) > MAX_RESOURCE_NAME:
                raise ConfigError(
                    f"{where}.name in {path}",
                    f"with renameByDefault the resource is served as {rename}, longer than "
                    f"{MAX_RESOURCE_NAME} characters (the kubelet would refuse it)",
                )
        if rename == r.name:
            rename = None
        resources.append(SharedResource(name=r.name, replicas=r.replicas, rename=rename,
                                        devices=_selection(r.devices), where=where, source_file=path,
                                        rename_by_default=chosen.renameByDefault))
    # MPS: failRequestsGreaterThanOne unset means true (the official plugin forces it at load).
    fail = chosen.failRequestsGreaterThanOne
    return Sharing(
        fail_requests_greater_than_one=mps if fail is None else fail,
        resources=tuple(resources),
        mps=mps,
    )
