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
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from nvdp.config.options import FILE_REFUSED, OPTIONS, Sharing, TimeSlicingResource
from nvdp.errors import ConfigError, config_error_from

log = logging.getLogger("nvdp.configfile")  # stable name: operators filter on it


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
    """`devices`: "all", a count > 0 or a list of device references (all three are then served
    as "all", as the official plugin does)."""
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
    renameByDefault: bool = False
    failRequestsGreaterThanOne: bool | None = None
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
    """The schema's struct fields as a tree of names, from the option table plus the blocks."""
    tree: dict[str, Any] = {"version": {}, "flags": {}, "sharing": {"timeSlicing": {}, "mps": {}}, "imex": {}}
    for key in [*(opt.file_key for opt in OPTIONS if opt.file_key), *FILE_REFUSED]:  # refused keys: found as the others
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


def read_config_file(path: str, read_text: Callable[[str], str]) -> tuple[dict[str, Any], Sharing]:
    """Parse a config file into {dotted key: raw value} lookups and the sharing block."""
    try:
        text = read_text(path)
    except OSError as exc:
        raise ConfigError("--config-file", f"error opening config file {path}: {exc.strerror or exc}") from exc
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("--config-file", f"{path} is not valid YAML or JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError("--config-file", f"{path}: the top level must be a mapping")
    doc = canonical_keys(doc, _STRUCT_FIELDS)
    if "resources" in doc:
        log.warning("Customizing the 'resources' field is not yet supported in the config. Ignoring...")
    try:
        model = _ConfigFile.model_validate(doc)
    except ValidationError as exc:
        raise config_error_from(exc, "config file") from exc
    return doc, _sharing_from(model.sharing)


def _sharing_from(block: _SharingFile | None) -> Sharing:
    if block is None or (block.timeSlicing is None and block.mps is None):
        return Sharing()
    if block.mps is not None:
        raise ConfigError("config file field sharing.mps", "MPS sharing is not supported by nvdp yet")
    ts = block.timeSlicing
    assert ts is not None  # the block is non-empty and has no mps
    resources = []
    for i, r in enumerate(ts.resources):
        assert r.name is not None and r.replicas is not None  # the validators reject None
        where = f"sharing.timeSlicing.resources.{i}"
        # As the official plugin (DisableResourceNamingInConfig): an explicit `rename` is dropped,
        # and renameByDefault serves every shared resource as `<name>.shared`, so pods keep
        # asking for the names the official plugin would advertise.
        rename = f"{r.name}.shared" if ts.renameByDefault else None
        if r.rename is not None and r.rename != rename:
            log.warning("%s.rename=%s is ignored (as in the official plugin); serving %s",
                        where, r.rename, rename or r.name)
        if rename is not None and len(rename) > MAX_RESOURCE_NAME:
            raise ConfigError(
                f"config file field {where}.name",
                f"with renameByDefault the resource is served as {rename}, longer than "
                f"{MAX_RESOURCE_NAME} characters (the kubelet would refuse it)",
            )
        if r.devices != "all":
            log.warning("%s.devices=%r: every device is shared (as in the official plugin)", where, r.devices)
        resources.append(TimeSlicingResource(name=r.name, replicas=r.replicas, rename=rename))
    return Sharing(
        fail_requests_greater_than_one=bool(ts.failRequestsGreaterThanOne),
        resources=tuple(resources),
    )
