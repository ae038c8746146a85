"""Helpers for the deployment checks: run the real helm binaries and validate manifests offline.

The tools come from `make test-deploy`: scripts/install-helm puts helm 3 and helm 4 in .tools/,
the `deploy` extra installs kubernetes-validate, and the Makefile fetches the old
kubernetes-validate release whose schemas still describe extensions/v1beta1. The `deploy` extra's
modules are imported where used: `make test` collects (then deselects) these tests without them.
"""

from __future__ import annotations

import functools
import json
import subprocess
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deployments" / "helm" / "nvidia-device-plugin"
STATIC = ROOT / "deployments" / "static"
CONTAINER = ROOT / "deployments" / "container"
TOOLS = ROOT / ".tools"
LEGACY_SCHEMAS = TOOLS / "cache" / "kubernetes-validate-1.16.0.tar.gz"

HELMS = {"helm3": TOOLS / "helm3" / "helm", "helm4": TOOLS / "helm4" / "helm"}
RELEASE = "ndp"
NAMESPACE = "nvidia-device-plugin"


@functools.cache
def k8s_versions() -> tuple[str, str]:
    """Kubernetes versions every manifest is validated against: our floor and the newest schema shipped."""
    import kubernetes_validate

    return "1.25.0", kubernetes_validate.utils.latest_version()

# extensions/v1beta1 DaemonSets (legacyDaemonsetAPI) exist in no schema of the current release;
# the 1.16.0 release still ships them. 1.10 is the oldest Kubernetes the seed chart supported,
# 1.15 the last that served the API.
LEGACY_K8S_VERSIONS = ("1.10.0", "1.15.0")


def helm(name: str) -> Path:
    path = HELMS[name]
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make test-deploy` (or scripts/install-helm) first")
    return path


def run_helm(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm(name)), *args], capture_output=True, text=True, timeout=60)


def values_args(tmp: Path, values: Mapping[str, Any] | None, files: Sequence[Path] = ()) -> list[str]:
    args = [a for f in files for a in ("-f", str(f))]
    if values:
        path = tmp / "values.yaml"
        path.write_text(yaml.safe_dump(dict(values)))
        args += ["-f", str(path)]
    return args


def template(name: str, args: Sequence[str], kube_version: str | None = None) -> subprocess.CompletedProcess[str]:
    kube = ["--kube-version", kube_version] if kube_version else []
    return run_helm(name, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *kube, *args)


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def only(docs: Sequence[Mapping[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['kind'] for d in docs]}"
    return dict(found[0])


MPS_SUFFIX = "-mps-control-daemon"


def plugin_daemonset(docs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The plugin's DaemonSet (the chart may render the MPS control daemon's beside it)."""
    return only([d for d in docs if not d["metadata"]["name"].endswith(MPS_SUFFIX)], "DaemonSet")


def mps_daemonset(docs: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    found = [d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"].endswith(MPS_SUFFIX)]
    assert len(found) <= 1
    return dict(found[0]) if found else None


def plugin_container(daemonset: Mapping[str, Any]) -> dict[str, Any]:
    return container(daemonset, "nvidia-device-plugin-ctr")


def container(daemonset: Mapping[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    """The pod's container (or init container) of that name; the plugin's is nvidia-device-plugin-ctr."""
    spec = daemonset["spec"]["template"]["spec"]
    found = [c for c in spec.get("initContainers" if init else "containers") or [] if c["name"] == name]
    assert len(found) == 1, f"no single container {name} in {[c['name'] for c in spec['containers']]}"
    return dict(found[0])


def env_of(container: Mapping[str, Any]) -> dict[str, str]:
    """Name -> value; a value from the downward API shows as "fieldRef:<path>"."""
    env = container.get("env") or []
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e["value"] if "value" in e else f"fieldRef:{e['valueFrom']['fieldRef']['fieldPath']}"
            for e in env}


# ---------------------------------------------------------------------------------------------
# Validation


@functools.cache
def _legacy_schema(version: str) -> tuple[dict[str, Any], Any]:
    import referencing
    import referencing.jsonschema

    if not LEGACY_SCHEMAS.exists():
        pytest.fail(f"{LEGACY_SCHEMAS} is missing: run `make test-deploy` first")
    folder = f"kubernetes-validate-1.16.0/src/kubernetes_validate/kubernetes-json-schema/v{version}-local-strict"
    with tarfile.open(LEGACY_SCHEMAS) as tar:
        def load(name: str) -> Any:
            member = tar.extractfile(f"{folder}/{name}")
            assert member is not None
            return json.load(member)

        schema = load("daemonset-extensions-v1beta1.json")
        definitions = load("_definitions.json")
    draft4 = referencing.jsonschema.DRAFT4
    registry = referencing.Registry().with_resource(
        "_definitions.json", referencing.Resource.from_contents(definitions, default_specification=draft4)
    )
    return schema, registry


def validate_legacy_daemonset(obj: Mapping[str, Any], version: str) -> None:
    """Strict validation of an extensions/v1beta1 DaemonSet with that Kubernetes version's schema."""
    import jsonschema

    schema, registry = _legacy_schema(version)
    jsonschema.Draft4Validator(schema, registry=registry).validate(dict(obj))


def validate_service_monitor(obj: Mapping[str, Any]) -> None:
    """No schema ships for the Prometheus operator's CRD: check the fields it requires by hand."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    spec = obj["spec"]
    assert isinstance(spec["selector"]["matchLabels"], dict) and spec["selector"]["matchLabels"]
    assert spec["endpoints"] and all(isinstance(e["port"], str) for e in spec["endpoints"])
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}


def validate(obj: Mapping[str, Any]) -> list[str]:
    """Validate one manifest strictly; returns what it was checked against (for the record)."""
    if obj["apiVersion"] == "extensions/v1beta1":
        for version in LEGACY_K8S_VERSIONS:
            validate_legacy_daemonset(obj, version)
        return [f"legacy-{v}" for v in LEGACY_K8S_VERSIONS]
    if obj["kind"] == "ServiceMonitor":
        validate_service_monitor(obj)
        return ["structural"]
    import kubernetes_validate

    for version in k8s_versions():
        try:
            kubernetes_validate.validate(dict(obj), version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} invalid for Kubernetes {version}: {where}: {exc}")
    return list(k8s_versions())


def static_manifests() -> Iterator[Path]:
    yield from sorted(STATIC.glob("*.yml"))
