"""GPU feature discovery in the chart (gfd.enabled) and the static GFD manifest: both helms agree,
lint clean, Kubernetes' strict schemas accept every object, and nvdp's own loader reads the
rendered env as meant."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from nvdp import __version__
from nvdp.backends.simulated.expand import build_node
from nvdp.backends.simulated.profile import load_profile
from nvdp.config.load import load
from nvdp.config.options import GFD_OPTIONS, GFD_OUTPUT_FILE
from nvdp.core.labels import node_labels
from tests.deploy.deploy_tools import (
    CHART,
    HELMS,
    NAMESPACE,
    RELEASE,
    STATIC,
    documents,
    run_helm,
    template,
    validate,
    values_args,
)

pytestmark = pytest.mark.deploy

GFD_NAME = f"{RELEASE}-nvidia-device-plugin-gpu-feature-discovery"
FEATURES_D = "/etc/kubernetes/node-feature-discovery/features.d"
DOWNWARD = {"NODE_NAME": "fieldRef:spec.nodeName", "NAMESPACE": "fieldRef:metadata.namespace",
            "POD_NAME": "fieldRef:metadata.name"}
RUNTIME_ENV = {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"}
OFFICIAL_AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "feature.node.kubernetes.io/pci-10de.present", "operator": "In",
                           "values": ["true"]}]},
    {"matchExpressions": [{"key": "feature.node.kubernetes.io/cpu-model.vendor_id", "operator": "In",
                           "values": ["NVIDIA"]}]},
    {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]},
]}}}

ON: dict[str, Any] = {"gfd": {"enabled": True}}
MPS_CONFIG = "version: v1\nsharing:\n  mps:\n    resources:\n    - {name: nvidia.com/gpu, replicas: 4}\n"
MPS_DAEMON = f"{RELEASE}-nvidia-device-plugin-mps-control-daemon"
CASES: dict[str, dict[str, Any]] = {
    "gfd": ON,
    "gfd-mig-mixed-timing": {"gfd": {"enabled": True, "noTimestamp": True, "sleepInterval": "5m"},
                             "migStrategy": "mixed", "failOnInitError": False},
    "gfd-official-top-level-timing": {**ON, "noTimestamp": False, "sleepInterval": "infinite"},
    "gfd-config-map": {**ON, "config": {"map": {"default": "version: v1\nflags:\n  migStrategy: single\n"}}},
    "gfd-driver-root-placement": {**ON, "nvidiaDriverRoot": "/run/nvidia/driver",
                                  "affinity": {"podAntiAffinity": {}}, "nodeSelector": {"gpu": "yes"},
                                  "logLevel": "debug", "deviceDiscoveryStrategy": "nvml"},
    "gfd-own-names": {"gfd": {"enabled": True, "nameOverride": "gfd", "namespaceOverride": "nfd",
                              "securityContext": {"privileged": True, "runAsUser": 0}}},
    # With an MPS config the MPS control daemon's DaemonSet renders too (docs/deployment.md, "MPS").
    "gfd-mps": {**ON, "config": {"map": {"default": MPS_CONFIG}}},
}


def render(helm: str, values: Mapping[str, Any], tmp: Path) -> list[dict[str, Any]]:
    result = template(helm, values_args(tmp, values))
    assert result.returncode == 0, result.stderr
    return documents(result.stdout)


def daemonsets(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "DaemonSet"}


def gfd_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return daemonsets(docs)[GFD_NAME]


def container(ds: Mapping[str, Any]) -> dict[str, Any]:
    (ctr,) = ds["spec"]["template"]["spec"]["containers"]
    return dict(ctr)


def env_of(ctr: Mapping[str, Any]) -> dict[str, str]:
    """Values as they are; downward-API entries as `fieldRef:<path>`."""
    out: dict[str, str] = {}
    for e in ctr.get("env") or []:
        assert e["name"] not in out, f"{e['name']} twice"
        out[e["name"]] = e["value"] if "value" in e else "fieldRef:" + e["valueFrom"]["fieldRef"]["fieldPath"]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_helm3_and_helm4_agree_and_lint_clean(case: str, tmp_path: Path) -> None:
    args = values_args(tmp_path, CASES[case])
    out = {name: template(name, args) for name in HELMS}
    for name, result in out.items():
        assert result.returncode == 0, f"{name}: {result.stderr}"
        lint = run_helm(name, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *args)
        assert lint.returncode == 0 and "[WARNING]" not in lint.stdout, lint.stdout + lint.stderr
    assert out["helm3"].stdout == out["helm4"].stdout


@pytest.mark.parametrize("helm", list(HELMS))
@pytest.mark.parametrize("case", list(CASES))
def test_every_manifest_is_valid(helm: str, case: str, tmp_path: Path) -> None:
    docs = render(helm, CASES[case], tmp_path)
    assert len(daemonsets(docs)) == (3 if case == "gfd-mps" else 2)
    for doc in docs:
        validate(doc)


def test_off_by_default(tmp_path: Path) -> None:
    assert list(daemonsets(render("helm4", {}, tmp_path))) == [f"{RELEASE}-nvidia-device-plugin"]
    assert list(daemonsets(render("helm4", {"gfd": {"enabled": False, "sleepInterval": "5m"}}, tmp_path))) == [
        f"{RELEASE}-nvidia-device-plugin"]


def test_the_gfd_daemonset(tmp_path: Path) -> None:
    docs = render("helm4", ON, tmp_path)
    ds = gfd_of(docs)
    assert ds["metadata"]["namespace"] == NAMESPACE
    pod = ds["spec"]["template"]["spec"]
    ctr = container(ds)
    assert ctr["command"] == ["gpu-feature-discovery"]
    assert ctr["image"] == f"ghcr.io/nvdp/nvdp:v{__version__}"
    assert ctr["securityContext"] == {"privileged": True}
    assert env_of(ctr) == {"USE_NODE_FEATURE_API": "false", **DOWNWARD, **RUNTIME_ENV}
    assert ctr["volumeMounts"] == [{"name": "output-dir", "mountPath": FEATURES_D},
                                   {"name": "host-sys", "mountPath": "/sys"}]
    assert pod["volumes"] == [
        {"name": "output-dir", "hostPath": {"path": FEATURES_D, "type": "DirectoryOrCreate"}},
        {"name": "host-sys", "hostPath": {"path": "/sys", "type": "Directory"}},
    ]
    assert pod["affinity"] == OFFICIAL_AFFINITY
    assert pod["automountServiceAccountToken"] is False
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # the two DaemonSets never select each other's pods
    plugin = daemonsets(docs)[f"{RELEASE}-nvidia-device-plugin"]
    gfd_pods = ds["spec"]["template"]["metadata"]["labels"]
    plugin_pods = plugin["spec"]["template"]["metadata"]["labels"]
    assert not plugin["spec"]["selector"]["matchLabels"].items() <= gfd_pods.items()
    assert not ds["spec"]["selector"]["matchLabels"].items() <= plugin_pods.items()
    assert ds["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "gpu-feature-discovery",
                                                     "app.kubernetes.io/instance": RELEASE}


def resolved(ctr: Mapping[str, Any], files: Mapping[str, str] | None = None) -> Any:
    """nvdp's own GFD loader over the rendered env (downward-API values filled in as the kubelet would)."""
    env = {k: ("node-1" if v.startswith("fieldRef:") else v) for k, v in env_of(ctr).items()}
    return load({}, env, read_text=lambda p: (files or {})[p], options=GFD_OPTIONS)


def test_nvdp_reads_the_rendered_env_as_meant(tmp_path: Path) -> None:
    ctr = container(gfd_of(render("helm4", CASES["gfd-mig-mixed-timing"], tmp_path)))
    cfg = resolved(ctr)
    assert (cfg.use_node_feature_api, cfg.no_timestamp, cfg.sleep_interval) == (False, True, 300.0)
    assert (cfg.mig_strategy, cfg.fail_on_init_error) == ("mixed", False)
    assert env_of(ctr)["NVIDIA_MIG_MONITOR_DEVICES"] == "all"
    # GFD writes where the hostPath is mounted
    mount = next(m for m in ctr["volumeMounts"] if m["name"] == "output-dir")
    assert os.path.dirname(cfg.output_file) == mount["mountPath"] and cfg.output_file == GFD_OUTPUT_FILE


def test_the_official_charts_top_level_timing_keys(tmp_path: Path) -> None:
    cfg = resolved(container(gfd_of(render("helm4", CASES["gfd-official-top-level-timing"], tmp_path))))
    assert cfg.no_timestamp is False and cfg.sleep_interval == float("inf")
    both = {"gfd": {"enabled": True, "sleepInterval": "30s"}, "sleepInterval": "5m"}
    assert resolved(container(gfd_of(render("helm4", both, tmp_path)))).sleep_interval == 30.0  # gfd.* first


def test_config_map_reaches_gfd(tmp_path: Path) -> None:
    docs = render("helm4", CASES["gfd-config-map"], tmp_path)
    ctr = container(gfd_of(docs))
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    files = {f"/available-configs/{k}": v for k, v in cm["data"].items()}
    assert resolved(ctr, files).mig_strategy == "single"
    assert {"name": "available-configs", "mountPath": "/available-configs", "readOnly": True} in ctr["volumeMounts"]
    assert "checksum/config" in gfd_of(docs)["spec"]["template"]["metadata"]["annotations"]


def test_gfd_labels_the_nodes_the_mps_daemon_selects(tmp_path: Path) -> None:
    """The MPS control daemon runs where nvidia.com/mps.capable=true: GFD reads the plugin's config
    file and, on a node it can share with MPS, writes exactly that label."""
    docs = render("helm4", CASES["gfd-mps"], tmp_path)
    sets = daemonsets(docs)
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "default" in d.get("data", {}))
    files = {f"/available-configs/{k}": v for k, v in cm["data"].items()}
    cfg = resolved(container(gfd_of(docs)), files)
    assert cfg.sharing.strategy == "mps"
    # The plugin and the MPS daemon read the config-manager's link; GFD the same default config.
    def main_container(ds: Mapping[str, Any]) -> dict[str, Any]:  # not the config-manager sidecar
        return dict(next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"].endswith("-ctr")))

    plugin_file = env_of(main_container(sets[f"{RELEASE}-nvidia-device-plugin"]))["CONFIG_FILE"]
    assert plugin_file == env_of(main_container(sets[MPS_DAEMON]))["CONFIG_FILE"] == "/config/config.yaml"
    selector = sets[MPS_DAEMON]["spec"]["template"]["spec"]["nodeSelector"]
    assert selector == {"nvidia.com/mps.capable": "true"}
    labels = node_labels(build_node(*load_profile("dgx-h100")), cfg, None, None).labels
    assert {key: labels[key] for key in selector} == selector
    assert labels["nvidia.com/gpu.sharing-strategy"] == "mps"


def test_placement_and_driver_root(tmp_path: Path) -> None:
    ds = gfd_of(render("helm4", CASES["gfd-driver-root-placement"], tmp_path))
    pod = ds["spec"]["template"]["spec"]
    # Helm merges an explicit affinity into the chart's default (the official GPU-node affinity,
    # values.yaml); `affinity: null` removes the default.
    assert "podAntiAffinity" in pod["affinity"] and "nodeAffinity" in pod["affinity"]
    assert pod["nodeSelector"] == {"gpu": "yes"}
    ctr = container(ds)
    assert {"name": "driver-root", "mountPath": "/driver-root", "readOnly": True} in ctr["volumeMounts"]
    assert {"name": "driver-root", "hostPath": {"path": "/run/nvidia/driver", "type": "Directory"}} in pod["volumes"]
    cfg = resolved(ctr)
    assert (cfg.log_level, cfg.device_discovery_strategy) == ("debug", "nvml")
    assert cfg.container_driver_root == "/driver-root"


def test_names_namespace_and_security_overrides(tmp_path: Path) -> None:
    ds = gfd_of(render("helm4", CASES["gfd-own-names"], tmp_path))
    assert ds["metadata"]["namespace"] == "nfd"
    assert ds["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "gfd"
    assert container(ds)["securityContext"] == {"privileged": True, "runAsUser": 0}


def test_every_rendered_env_var_is_one_gfd_or_the_runtime_reads(tmp_path: Path) -> None:
    known = {e for o in GFD_OPTIONS for e in o.envs} | set(RUNTIME_ENV) | {"NVIDIA_MIG_MONITOR_DEVICES", "POD_NAME"}
    for case, values in CASES.items():
        assert set(env_of(container(gfd_of(render("helm4", values, tmp_path))))) <= known, case


@pytest.mark.parametrize("helm", list(HELMS))
@pytest.mark.parametrize(("values", "message"), [
    ({"nfd": {"enabled": True}}, "Install NFD yourself"),
    ({**ON, "nfd": {"enabled": True}}, "Install NFD yourself"),
    ({"gfd": {"enabled": True, "sleepInterval": "soon"}}, "sleepInterval"),
    ({"gfd": {"enabled": "yes"}}, "enabled"),
    ({"noTimestamp": "no"}, "noTimestamp"),
])
def test_rejected(helm: str, values: dict[str, Any], message: str, tmp_path: Path) -> None:
    result = template(helm, values_args(tmp_path, values))
    assert result.returncode != 0, result.stdout
    assert message in result.stderr
    assert "Install NFD yourself" not in result.stderr or "nfd" in json.dumps(values)


def test_notes_say_nfd_is_needed(tmp_path: Path) -> None:
    result = run_helm("helm4", "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                      *values_args(tmp_path, ON))
    assert result.returncode == 0, result.stderr
    assert "node feature discovery (NFD) must run in the cluster" in " ".join(result.stdout.split())


# ---------------------------------------------------------------------------------------------
# The static manifest

STATIC_GFD = STATIC / "gpu-feature-discovery-daemonset.yaml"


def test_static_manifest() -> None:
    docs = [d for d in yaml.safe_load_all(STATIC_GFD.read_text()) if d]
    (ds,) = docs
    validate(ds)
    assert ds["kind"] == "DaemonSet" and ds["metadata"]["name"] == "gpu-feature-discovery"
    assert "namespace" not in ds["metadata"]  # as the official one: applied with -n
    # the official selector, so applying it over the official GFD replaces it in place
    assert ds["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "gpu-feature-discovery",
                                                     "app.kubernetes.io/part-of": "nvidia-gpu"}
    assert ds["metadata"]["labels"]["app.kubernetes.io/version"] == __version__
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == __version__
    ctr = container(ds)
    assert ctr["image"] == f"ghcr.io/nvdp/nvdp:v{__version__}"
    assert ctr["command"] == ["gpu-feature-discovery"]
    assert ctr["securityContext"] == {"privileged": True}
    assert pod["affinity"] == OFFICIAL_AFFINITY
    assert pod["volumes"] == [
        {"name": "output-dir", "hostPath": {"path": FEATURES_D, "type": "DirectoryOrCreate"}},
        {"name": "host-sys", "hostPath": {"path": "/sys", "type": "Directory"}},
    ]
    env = {k: ("node-1" if v.startswith("fieldRef:") else v) for k, v in env_of(ctr).items()}
    cfg = load({}, env, options=GFD_OPTIONS)
    assert (cfg.mig_strategy, cfg.use_node_feature_api, cfg.node_name) == ("none", False, "node-1")
    assert os.path.dirname(cfg.output_file) == FEATURES_D


def test_node_feature_api_mode_gets_exactly_its_rbac(tmp_path: Path) -> None:
    from nvdp.kube.rbac import GFD_RULES

    docs = render("helm4", {"gfd": {"enabled": True, "useNodeFeatureAPI": True, "namespaceOverride": "nfd"}}, tmp_path)
    pod = gfd_of(docs)["spec"]["template"]["spec"]
    assert env_of(container(gfd_of(docs)))["USE_NODE_FEATURE_API"] == "true"
    (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert pod["serviceAccountName"] == account["metadata"]["name"] and "automountServiceAccountToken" not in pod
    (role,) = [d for d in docs if d["kind"] == "Role"]
    granted = {(g, r, frozenset(rule["verbs"])) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"]}
    assert granted == {(r.group, r.resource, r.verbs) for r in GFD_RULES}
    assert role["metadata"]["namespace"] == account["metadata"]["namespace"] == "nfd"
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "nfd"}]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    # file mode (the default): no account, no token, no RBAC
    plain = render("helm4", {"gfd": {"enabled": True}}, tmp_path)
    assert gfd_of(plain)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert not [d for d in plain if "Role" in d["kind"] or d["kind"] == "ServiceAccount"]
