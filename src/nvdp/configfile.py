"""The config file (schema v1): parsed with pydantic, imported only when a file is given.

The official plugin reads the file with encoding/json semantics: unknown keys are ignored, so
existing files keep loading; wrong types and unknown versions are errors naming the field.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nvdp.config import Sharing, TimeSlicingResource
from nvdp.errors import ConfigError, config_error_from

log = logging.getLogger(__name__)


class _FileModel(BaseModel):
    # The official plugin ignores unknown keys (encoding/json); so do we, so existing files load.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _TimeSlicingResourceFile(_FileModel):
    name: str
    replicas: int = Field(ge=1)
    rename: str | None = None
    devices: Any = "all"


class _SharingStrategyFile(_FileModel):
    renameByDefault: bool = False
    failRequestsGreaterThanOne: bool | None = None
    resources: list[_TimeSlicingResourceFile] = Field(default_factory=list)


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
    try:
        model = _ConfigFile.model_validate(doc)
    except ValidationError as exc:
        raise config_error_from(exc, "config file") from exc
    return doc, _sharing_from(model.sharing)


def _sharing_from(block: _SharingFile | None) -> Sharing:
    if block is None or (block.timeSlicing is None and block.mps is None):
        return Sharing()
    if block.mps is not None and block.mps.resources:
        raise ConfigError("config file field sharing.mps", "MPS sharing is not supported by nvdp yet")
    ts = block.timeSlicing
    if ts is None or not ts.resources:
        return Sharing()
    resources = []
    for i, r in enumerate(ts.resources):
        name = r.name if "/" in r.name else f"nvidia.com/{r.name}"
        rename = r.rename
        if rename is None and ts.renameByDefault:
            rename = f"{name}.shared"
        elif rename is not None and "/" not in rename:
            rename = f"nvidia.com/{rename}"
        if r.devices != "all":
            log.warning("sharing.timeSlicing.resources[%d].devices=%r: only 'all' is honoured "
                        "(as in the official plugin)", i, r.devices)
        resources.append(TimeSlicingResource(name=name, replicas=r.replicas, rename=rename))
    return Sharing(
        strategy="time-slicing",
        rename_by_default=ts.renameByDefault,
        fail_requests_greater_than_one=bool(ts.failRequestsGreaterThanOne),
        resources=tuple(resources),
    )
