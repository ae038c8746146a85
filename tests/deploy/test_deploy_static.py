"""deployments/static/: valid for Kubernetes 1.25 and the newest schemas, least privilege."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from nvdp import __version__
from tests.deploy.deploy_tools import STATIC, env_of, only, plugin_container, static_manifests, validate

pytestmark = pytest.mark.deploy

PLAIN = STATIC / "nvidia-device-plugin.yml"
CPU_MANAGER = STATIC / "nvidia-device-plugin-compat-with-cpumanager.yml"


def load(path: Path) -> dict[str, Any]:
    return only([d for d in yaml.safe_load_all(path.read_text()) if d], "DaemonSet")


def test_the_two_variants_exist() -> None:
    assert list(static_manifests()) == sorted([PLAIN, CPU_MANAGER])


@pytest.mark.parametrize("path", list(static_manifests()), ids=lambda p: p.name)
def test_valid_and_shaped_like_the_official_manifest(path: Path) -> None:
    ds = load(path)
    validate(ds)
    assert (ds["metadata"]["name"], ds["metadata"]["namespace"]) == ("nvidia-device-plugin-daemonset", "kube-system")
    # The official selector: applying over an existing official deployment updates it in place.
    assert ds["spec"]["selector"]["matchLabels"] == {"name": "nvidia-device-plugin-ds"}
    pod = ds["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["volumes"] == [{"name": "device-plugin", "hostPath": {
        "path": "/var/lib/kubelet/device-plugins", "type": "Directory"}}]
    ctr = plugin_container(ds)
    assert ctr["image"] == f"ghcr.io/nvdp/nvdp:v{__version__}"
    assert ctr["volumeMounts"] == [{"name": "device-plugin", "mountPath": "/var/lib/kubelet/device-plugins"}]
    assert env_of(ctr)["FAIL_ON_INIT_ERROR"] == "false"
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True


def test_plain_manifest_has_no_privileges() -> None:
    ctr = plugin_container(load(PLAIN))
    assert ctr["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}
    assert "args" not in ctr


def test_cpu_manager_variant_is_privileged_and_passes_device_specs() -> None:
    ctr = plugin_container(load(CPU_MANAGER))
    assert ctr["securityContext"] == {"privileged": True, "readOnlyRootFilesystem": True}
    assert ctr["args"] == ["--pass-device-specs"]
