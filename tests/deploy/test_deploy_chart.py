"""The Helm chart, checked with the real helm 3 and helm 4 and with Kubernetes' own schemas.

Every case is rendered by both helms (they must agree byte for byte), linted, validated strictly,
and its plugin container is checked: the securityContext, the env vars each value turns into, and
that nvdp's own config loader reads that env (and the rendered config file) as intended.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from nvdp import __version__
from nvdp.config.load import load
from nvdp.config.manager import MANAGER_OPTIONS, load_manager_settings
from nvdp.config.options import OPTIONS
from nvdp.core.nodeconfig import Chosen, choose
from nvdp.kube.rbac import CLUSTER_HEALTH_RULES, CONFIG_MANAGER_RULES
from tests.deploy.deploy_tools import (
    CHART,
    HELMS,
    NAMESPACE,
    RELEASE,
    ROOT,
    container,
    documents,
    env_of,
    mps_daemonset,
    only,
    plugin_container,
    plugin_daemonset,
    run_helm,
    template,
    validate,
    values_args,
)

pytestmark = pytest.mark.deploy

FIXTURES = Path(__file__).parent / "fixtures"
RUNTIME_ENV = {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"}

RESTRICTED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}
PRIVILEGED = {"privileged": True, "readOnlyRootFilesystem": True}
SYS_ADMIN = {"capabilities": {"add": ["SYS_ADMIN"]}}


@dataclass(frozen=True)
class Case:
    values: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)  # exactly the env besides RUNTIME_ENV
    security: Mapping[str, Any] = field(default_factory=lambda: RESTRICTED)
    config: Mapping[str, Any] = field(default_factory=dict)  # Config fields nvdp must resolve
    files: tuple[str, ...] = ()  # values files from fixtures/
    kube_version: str | None = None


MIG_ON = {"NVIDIA_MIG_MONITOR_DEVICES": "all"}
FLAGS = ("no-additional-gids-for-device-nodes", "disable-nvsandbox-utils")  # upstream names: others exit 2
MPS_ON = {"MPS_ROOT": "/run/nvidia/mps"}
CONFIG_DEFAULT = "version: v1\nflags:\n  migStrategy: mixed\n  plugin:\n    deviceIDStrategy: index\n"
CONFIG_MPS = ("version: v1\nsharing:\n  mps:\n    resources:\n"
              "    - {name: nvidia.com/gpu, replicas: 4, devices: [6, 7], rename: nvidia.com/gpu.shared}\n")

CASES = [
    pytest.param(Case(), id="default"),
    pytest.param(Case({"compatWithCPUManager": True}, {"PASS_DEVICE_SPECS": "true"}, PRIVILEGED,
                      {"pass_device_specs": True}), id="compatWithCPUManager"),
    pytest.param(Case({"migStrategy": "none"}, {"MIG_STRATEGY": "none"}, RESTRICTED,
                      {"mig_strategy": "none"}), id="mig-none"),
    pytest.param(Case({"migStrategy": "single"}, {"MIG_STRATEGY": "single", **MIG_ON}, SYS_ADMIN,
                      {"mig_strategy": "single"}), id="mig-single"),
    pytest.param(Case({"migStrategy": "mixed"}, {"MIG_STRATEGY": "mixed", **MIG_ON}, SYS_ADMIN,
                      {"mig_strategy": "mixed"}), id="mig-mixed"),
    pytest.param(Case({"deviceListStrategy": "volume-mounts"}, {"DEVICE_LIST_STRATEGY": "volume-mounts"}, SYS_ADMIN,
                      {"device_list_strategy": ("volume-mounts",)}), id="volume-mounts"),
    pytest.param(Case({"deviceListStrategy": ["envvar", "cdi-annotations"]},
                      {"DEVICE_LIST_STRATEGY": "envvar,cdi-annotations"}, RESTRICTED,
                      {"device_list_strategy": ("envvar", "cdi-annotations")}), id="list-strategies"),
    pytest.param(Case({"deviceIDStrategy": "index"}, {"DEVICE_ID_STRATEGY": "index"}, RESTRICTED,
                      {"device_id_strategy": "index"}), id="index"),
    pytest.param(Case({"nvidiaDriverRoot": "/run/nvidia/driver"}, {"NVIDIA_DRIVER_ROOT": "/run/nvidia/driver"},
                      RESTRICTED, {"driver_root": "/run/nvidia/driver", "dev_root": "/run/nvidia/driver"}),
                 id="driver-root"),
    pytest.param(Case({"failOnInitError": False}, {"FAIL_ON_INIT_ERROR": "false"}, RESTRICTED,
                      {"fail_on_init_error": False}), id="failOnInitError-false"),
    pytest.param(Case({"legacyDaemonsetAPI": True}, kube_version="1.15.0"), id="legacyDaemonsetAPI"),
    pytest.param(Case({"config": {"map": {"default": CONFIG_DEFAULT}}},
                      {"CONFIG_FILE": "/config/config.yaml", **MIG_ON}, SYS_ADMIN,
                      {"mig_strategy": "mixed", "device_id_strategy": "index"}), id="config-map"),
    pytest.param(Case({"config": {"map": {"a": "version: v1\n",
                                          "b": {"version": "v1", "flags": {"migStrategy": "single"}}},
                                  "default": "b"}},
                      {"CONFIG_FILE": "/config/config.yaml", **MIG_ON}, SYS_ADMIN, {"mig_strategy": "single"}),
                 id="config-map-default-key"),
    pytest.param(Case({"config": {"map": {"only": "version: v1\nflags:\n  failOnInitError: false\n"}}},
                      {"CONFIG_FILE": "/config/config.yaml", **MIG_ON}, SYS_ADMIN, {"fail_on_init_error": False}),
                 id="config-map-single-entry"),
    pytest.param(Case({"config": {"name": "site-gpu-config", "default": "a100"}},
                      {"CONFIG_FILE": "/config/config.yaml", **MIG_ON, **MPS_ON}, SYS_ADMIN,
                      {"mps_root": "/run/nvidia/mps"}), id="config-external"),
    pytest.param(Case({"config": {"map": {"default": CONFIG_MPS}}},
                      {"CONFIG_FILE": "/config/config.yaml", **MIG_ON, **MPS_ON}, SYS_ADMIN,
                      {"mps_root": "/run/nvidia/mps", "mps_dir": "/mps"}), id="config-map-mps"),
    pytest.param(Case({"config": {"map": {"default": {"version": "v1", "sharing": {"mps": {"resources": [
                          {"name": "nvidia.com/gpu", "replicas": 2}]}}}}}, "mps": {"root": "/var/lib/mps"}},
                      {"CONFIG_FILE": "/config/config.yaml", **MIG_ON, "MPS_ROOT": "/var/lib/mps"}, SYS_ADMIN,
                      {"mps_root": "/var/lib/mps"}), id="config-map-mps-as-mapping"),
    pytest.param(Case({"compatWithCPUManager": True, "securityContext": {"privileged": False, "runAsUser": 0}},
                      {"PASS_DEVICE_SPECS": "true"}, {"privileged": False, "runAsUser": 0}),
                 id="explicit-securityContext"),
    pytest.param(Case({"gdrcopyEnabled": True, "gdsEnabled": False, "mofedEnabled": True,
                       "deviceDiscoveryStrategy": "nvml", "nvidiaDevRoot": "/", "logLevel": "debug",
                       "cdi": {"nvidiaHookPath": "/opt/nvidia-cdi-hook", "featureFlags": list(FLAGS)},
                       "extraEnv": [{"name": "NVDP_EXTRA", "value": "1"}]},
                      {"GDRCOPY_ENABLED": "true", "GDS_ENABLED": "false", "MOFED_ENABLED": "true",
                       "DEVICE_DISCOVERY_STRATEGY": "nvml", "NVIDIA_DEV_ROOT": "/", "NVDP_LOG_LEVEL": "debug",
                       "NVIDIA_CDI_HOOK_PATH": "/opt/nvidia-cdi-hook", "CDI_FEATURE_FLAGS": ",".join(FLAGS),
                       "NVDP_EXTRA": "1"},
                      RESTRICTED,
                      {"gdrcopy_enabled": True, "gds_enabled": False, "mofed_enabled": True,
                       "device_discovery_strategy": "nvml", "dev_root": "/", "log_level": "debug",
                       "nvidia_cdi_hook_path": "/opt/nvidia-cdi-hook", "cdi_feature_flags": FLAGS}),
                 id="other-plugin-settings"),
    pytest.param(Case({"clusterHealth": {"enabled": True, "taintOnFatal": True}},
                      {"NVDP_CLUSTER_HEALTH": "true", "NVDP_TAINT_ON_FATAL": "true",
                       "NODE_NAME": "fieldRef:spec.nodeName"}, RESTRICTED,
                      {"cluster_health": True, "taint_on_fatal": True}), id="cluster-health"),
    pytest.param(Case({"metrics": {"enabled": True, "serviceMonitor": {"enabled": True}}, "probes": {"enabled": True}},
                      {"NVDP_METRICS_ADDRESS": "0.0.0.0:9401"}), id="metrics-probes-servicemonitor"),
    pytest.param(Case(files=("seed-v0.9.0-values.yaml",),
                      env={"MIG_STRATEGY": "single", **MIG_ON, "FAIL_ON_INIT_ERROR": "false",
                           "DEVICE_LIST_STRATEGY": "envvar", "DEVICE_ID_STRATEGY": "index",
                           "NVIDIA_DRIVER_ROOT": "/run/nvidia/driver"},
                      security=SYS_ADMIN,
                      config={"mig_strategy": "single", "fail_on_init_error": False,
                              "device_list_strategy": ("envvar",), "device_id_strategy": "index",
                              "driver_root": "/run/nvidia/driver", "pass_device_specs": False}),
                 id="seed-v0.9.0-values-file"),
    pytest.param(Case(files=("official-later-values.yaml",),
                      env={"CONFIG_FILE": "/config/config.yaml", **MIG_ON,
                           "NVIDIA_CDI_HOOK_PATH": "/usr/local/nvidia/toolkit/nvidia-cdi-hook"},
                      security=SYS_ADMIN, config={"mig_strategy": "mixed"}),
                 id="official-later-values-file"),
]

HELM_NAMES = list(HELMS)


@pytest.fixture(scope="module")
def render(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Render a case with one helm; each (helm, case) is rendered once per module."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def go(helm_name: str, case: Case) -> list[dict[str, Any]]:
        key = helm_name + json.dumps(dataclasses.asdict(case), sort_keys=True)
        if key not in cache:
            args = values_args(tmp_path_factory.mktemp("values"), case.values, [FIXTURES / f for f in case.files])
            result = template(helm_name, args, case.kube_version)
            assert result.returncode == 0, result.stderr
            cache[key] = documents(result.stdout)
        return cache[key]

    return go


@pytest.mark.parametrize("case", CASES)
def test_helm3_and_helm4_render_the_same(case: Case, tmp_path: Path) -> None:
    args = values_args(tmp_path, case.values, [FIXTURES / f for f in case.files])
    out = {name: template(name, args, case.kube_version) for name in HELM_NAMES}
    for name, result in out.items():
        assert result.returncode == 0, f"{name}: {result.stderr}"
    assert out["helm3"].stdout == out["helm4"].stdout


@pytest.mark.parametrize("helm_name", HELM_NAMES)
@pytest.mark.parametrize("case", CASES)
def test_lint(helm_name: str, case: Case, tmp_path: Path) -> None:
    args = values_args(tmp_path, case.values, [FIXTURES / f for f in case.files])
    kube = ["--kube-version", case.kube_version] if case.kube_version else []
    # --strict turns warnings into failures; the legacy API case warns on purpose (helm knows
    # extensions/v1beta1 is deprecated), so there only that one warning is allowed.
    legacy = bool(case.values.get("legacyDaemonsetAPI"))
    strict = [] if legacy else ["--strict"]
    result = run_helm(helm_name, "lint", *strict, str(CHART), "--namespace", NAMESPACE, *kube, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    warnings = [line for line in result.stdout.splitlines() if "[WARNING]" in line or "[ERROR]" in line]
    if legacy:
        assert len(warnings) == 1 and "extensions/v1beta1 DaemonSet is deprecated" in warnings[0], warnings
    else:
        assert warnings == []


@pytest.mark.parametrize("helm_name", HELM_NAMES)
@pytest.mark.parametrize("case", CASES)
def test_every_manifest_is_valid(render: Any, helm_name: str, case: Case) -> None:
    docs = render(helm_name, case)
    assert docs
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize("case", CASES)
def test_container_security_and_env(render: Any, case: Case) -> None:
    ds = plugin_daemonset(render("helm4", case))
    ctr = plugin_container(ds)
    assert ctr["securityContext"] == case.security
    # privileged only when asked for, through compatWithCPUManager or an explicit securityContext
    if ctr["securityContext"].get("privileged"):
        assert case.values.get("compatWithCPUManager") and not case.values.get("securityContext")
    assert env_of(ctr) == {**case.env, **RUNTIME_ENV}
    assert ctr["command"] == ["nvidia-device-plugin"]


def _linked_config(docs: list[dict[str, Any]], label: str = "", ds: Mapping[str, Any] | None = None,
                   init: str = "nvidia-device-plugin-init") -> dict[str, str]:
    """What /config/config.yaml holds once the init container `init` of `ds` (the plugin's by
    default) ran: the rendered config-manager env and ConfigMap, resolved by nvdp's own selection
    (an external ConfigMap: a minimal file)."""
    ds = plugin_daemonset(docs) if ds is None else ds
    if not ds["spec"]["template"]["spec"].get("initContainers"):
        return {}
    settings = load_manager_settings({}, env_of(container(ds, init, init=True)))
    maps = [d for d in docs if d["kind"] == "ConfigMap"]
    if not maps:
        return {settings.dst: "version: v1\n"}
    data = maps[0]["data"]
    chosen = choose(label, set(data), settings.default_config, settings.fallbacks)
    assert isinstance(chosen, Chosen), chosen
    return {settings.dst: data[chosen.name] if chosen.name else ""}


@pytest.mark.parametrize("case", CASES)
def test_nvdp_reads_the_rendered_env_as_meant(render: Any, case: Case) -> None:
    """The env (and the config the init container links) the chart renders, resolved by nvdp's
    own config-manager selection and config loader."""
    docs = render("helm4", case)
    env = env_of(plugin_container(plugin_daemonset(docs)))
    files = _linked_config(docs)
    cfg = load({}, env, read_text=lambda p: files[p])
    for name, expected in case.config.items():
        assert getattr(cfg, name) == expected, name


def test_every_rendered_env_var_is_one_nvdp_or_the_runtime_reads(render: Any) -> None:
    known = {e for o in OPTIONS for e in o.envs} | set(RUNTIME_ENV) | {"NVIDIA_MIG_MONITOR_DEVICES"}
    for param in CASES:
        case = param.values[0]
        assert isinstance(case, Case)  # pytest types a parameter as object
        env = env_of(plugin_container(plugin_daemonset(render("helm4", case))))
        extra = {e["name"] for e in case.values.get("extraEnv", [])}
        assert set(env) - extra <= known, param.id


# ---------------------------------------------------------------------------------------------
# Individual values


def _ds(render: Any, values: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
    return plugin_daemonset(render("helm4", Case(dict(values), **kw)))


def test_default_image_is_ours_at_the_app_version(render: Any) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__ == chart["version"]
    ctr = plugin_container(_ds(render, {}))
    assert ctr["image"] == f"ghcr.io/nvdp/nvdp:v{__version__}"
    assert ctr["imagePullPolicy"] == "IfNotPresent"


def test_image_values(render: Any) -> None:
    ds = _ds(render, {"image": {"repository": "registry.local/nvdp", "tag": "dev", "pullPolicy": "Always"},
                      "imagePullSecrets": [{"name": "pull"}]})
    ctr = plugin_container(ds)
    assert (ctr["image"], ctr["imagePullPolicy"]) == ("registry.local/nvdp:dev", "Always")
    assert ds["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "pull"}]


def test_names_and_namespace(render: Any) -> None:
    assert _ds(render, {})["metadata"]["name"] == f"{RELEASE}-nvidia-device-plugin"
    assert _ds(render, {})["metadata"]["namespace"] == NAMESPACE
    assert _ds(render, {"nameOverride": "gpu"})["metadata"]["name"] == f"{RELEASE}-gpu"
    ds = _ds(render, {"fullnameOverride": "nvdp", "namespaceOverride": "gpu-system"})
    assert (ds["metadata"]["name"], ds["metadata"]["namespace"]) == ("nvdp", "gpu-system")


def test_selector_labels_override_keeps_an_existing_selector(render: Any) -> None:
    default = _ds(render, {})
    assert default["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "nvidia-device-plugin", "app.kubernetes.io/instance": RELEASE}
    ds = _ds(render, {"selectorLabelsOverride": {"name": "nvidia-device-plugin-ds"}})
    assert ds["spec"]["selector"]["matchLabels"] == {"name": "nvidia-device-plugin-ds"}
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["name"] == "nvidia-device-plugin-ds"  # the selector must match the pods


def test_pod_placement_and_scheduling_values(render: Any) -> None:
    values = {
        "nodeSelector": {"gpu": "yes"},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]}]}}},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
        "priorityClassName": "gpu-critical",
        "runtimeClassName": "nvidia",
        "updateStrategy": {"type": "OnDelete"},
        "podAnnotations": {"team": "ml"},
        "podSecurityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "resources": {"limits": {"memory": "128Mi"}},
    }
    ds = _ds(render, values)
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "yes"}
    assert pod["affinity"] == values["affinity"]
    assert pod["tolerations"] == values["tolerations"]
    assert (pod["priorityClassName"], pod["runtimeClassName"]) == ("gpu-critical", "nvidia")
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert ds["spec"]["template"]["metadata"]["annotations"] == {"team": "ml"}
    assert pod["securityContext"] == values["podSecurityContext"]
    assert plugin_container(ds)["resources"] == values["resources"]
    validate(ds)


def test_default_placement(render: Any) -> None:
    pod = _ds(render, {})["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"key": "CriticalAddonsOnly", "operator": "Exists"},
                                  {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"] == OFFICIAL_AFFINITY and "nodeSelector" not in pod  # as in the official chart
    assert pod["automountServiceAccountToken"] is False


# The official chart's default affinity (v0.20): a node with an NVIDIA PCI device (NFD's label), an
# NVIDIA CPU (some Tegra systems) or the label an operator sets by hand.
OFFICIAL_AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "feature.node.kubernetes.io/pci-10de.present", "operator": "In",
                           "values": ["true"]}]},
    {"matchExpressions": [{"key": "feature.node.kubernetes.io/cpu-model.vendor_id", "operator": "In",
                           "values": ["NVIDIA"]}]},
    {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]},
]}}}


@pytest.mark.parametrize("helm_name", HELM_NAMES)
def test_default_affinity_keeps_the_plugin_on_gpu_nodes(render: Any, helm_name: str) -> None:
    """As the official chart: without it every untainted CPU node gets a crash-looping pod."""
    ds = plugin_daemonset(render(helm_name, Case()))
    assert ds["spec"]["template"]["spec"]["affinity"] == OFFICIAL_AFFINITY
    validate(ds)


def test_affinity_null_removes_the_default(render: Any) -> None:
    assert "affinity" not in _ds(render, {"affinity": None})["spec"]["template"]["spec"]


def test_only_the_kubelet_folder_is_mounted_by_default(render: Any) -> None:
    pod = _ds(render, {})["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "device-plugin", "hostPath": {
        "path": "/var/lib/kubelet/device-plugins", "type": "Directory"}}]


def test_a_cdi_strategy_mounts_the_nodes_cdi_folder(render: Any) -> None:
    for strategy in ("cdi-cri", ["envvar", "cdi-annotations"]):
        pod = _ds(render, {"deviceListStrategy": strategy})["spec"]["template"]["spec"]
        volume = {"name": "cdi-specs", "hostPath": {"path": "/var/run/cdi", "type": "DirectoryOrCreate"}}
        assert volume in pod["volumes"]
        mounts = plugin_container(_ds(render, {"deviceListStrategy": strategy}))["volumeMounts"]
        assert {"name": "cdi-specs", "mountPath": "/var/run/cdi"} in mounts
    cfg = load({}, env_of(plugin_container(_ds(render, {"deviceListStrategy": "cdi-cri"}))))
    assert cfg.cdi_spec_dir == "/var/run/cdi"  # where nvdp writes them by default


def test_driver_root_is_mounted_read_only_where_nvdp_looks(render: Any) -> None:
    ds = _ds(render, {"nvidiaDriverRoot": "/run/nvidia/driver"})
    pod = ds["spec"]["template"]["spec"]
    assert {"name": "driver-root", "hostPath": {"path": "/run/nvidia/driver", "type": "Directory"}} in pod["volumes"]
    mount = next(m for m in plugin_container(ds)["volumeMounts"] if m["name"] == "driver-root")
    cfg = load({}, env_of(plugin_container(ds)))
    assert mount == {"name": "driver-root", "mountPath": cfg.container_driver_root, "readOnly": True}


def test_legacy_daemonset_api(render: Any) -> None:
    ds = _ds(render, {"legacyDaemonsetAPI": True}, kube_version="1.15.0")
    assert ds["apiVersion"] == "extensions/v1beta1"
    assert _ds(render, {})["apiVersion"] == "apps/v1"


def test_inline_config_map(render: Any) -> None:
    docs = render("helm4", Case({"config": {"map": {"default": CONFIG_DEFAULT}}}))
    cm = only(docs, "ConfigMap")
    assert cm["metadata"]["name"] == f"{RELEASE}-nvidia-device-plugin-configs"
    assert cm["data"] == {"default": CONFIG_DEFAULT.rstrip("\n")}
    pod = plugin_daemonset(docs)["spec"]["template"]
    assert re.fullmatch(r"[0-9a-f]{64}", pod["metadata"]["annotations"]["checksum/config"])
    assert {"name": "available-configs", "configMap": {"name": cm["metadata"]["name"]}} in pod["spec"]["volumes"]
    assert {"name": "config", "emptyDir": {}} in pod["spec"]["volumes"]


def test_config_change_rolls_the_pods(render: Any) -> None:
    def checksum(text: str) -> str:
        ds = plugin_daemonset(render("helm4", Case({"config": {"map": {"default": text}}})))
        return str(ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"])
    assert checksum("version: v1\n") != checksum(CONFIG_DEFAULT)


def test_external_config_map_is_not_rendered(render: Any) -> None:
    docs = render("helm4", Case({"config": {"name": "site-gpu-config", "default": "a100"}}))
    # The plugin's DaemonSet and, as MPS may be on, the MPS control daemon's; the config-manager's RBAC.
    assert sorted(d["kind"] for d in docs) == ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "DaemonSet", "Role",
                                               "RoleBinding", "ServiceAccount"]
    volumes = plugin_daemonset(docs)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "available-configs", "configMap": {"name": "site-gpu-config"}} in volumes


def test_metrics_service_monitor_and_probes(render: Any) -> None:
    docs = render("helm4", Case({"metrics": {"enabled": True, "serviceMonitor": {"enabled": True}},
                                 "probes": {"enabled": True}}))
    assert sorted(d["kind"] for d in docs) == ["DaemonSet", "Service", "ServiceMonitor"]
    ctr = plugin_container(plugin_daemonset(docs))
    assert ctr["ports"] == [{"name": "metrics", "containerPort": 9401, "protocol": "TCP"}]
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    service, monitor = only(docs, "Service"), only(docs, "ServiceMonitor")
    assert service["spec"]["ports"][0]["name"] == monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    pod_labels = plugin_daemonset(docs)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_metrics_and_probes_are_off_by_default(render: Any) -> None:
    docs = render("helm4", Case())
    ctr = plugin_container(plugin_daemonset(docs))
    assert not {"ports", "livenessProbe", "readinessProbe"} & set(ctr)
    assert "NVDP_METRICS_ADDRESS" not in env_of(ctr)


def test_extra_args(render: Any) -> None:
    ctr = plugin_container(_ds(render, {"extraArgs": ["--log-level=debug"]}))
    assert ctr["args"] == ["--log-level=debug"]


# ---------------------------------------------------------------------------------------------
# Rejected values: the schema (types, strategies) and validation.yaml (combinations)

REJECTED = [
    pytest.param({"migStrategy": "dual"}, "migStrategy", id="unknown-mig-strategy"),
    pytest.param({"deviceListStrategy": "files"}, "deviceListStrategy", id="unknown-list-strategy"),
    pytest.param({"deviceListStrategy": ["envvar", "bogus"]}, "deviceListStrategy", id="unknown-list-item"),
    pytest.param({"deviceIDStrategy": "serial"}, "deviceIDStrategy", id="unknown-id-strategy"),
    pytest.param({"failOnInitError": "yes"}, "failOnInitError", id="bool-as-string"),
    pytest.param({"compatWithCPUManager": 1}, "compatWithCPUManager", id="bool-as-int"),
    pytest.param({"nvidiaDriverRoot": "run/nvidia"}, "nvidiaDriverRoot", id="relative-driver-root"),
    pytest.param({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy", id="pull-policy"),
    pytest.param({"image": {"tag": 1.0}}, "tag", id="numeric-tag"),
    pytest.param({"resources": {"limit": {}}}, "limit", id="resources-typo"),
    pytest.param({"tolerations": {"key": "x"}}, "tolerations", id="tolerations-not-a-list"),
    pytest.param({"config": {"map": {"a": "x"}, "name": "cm"}}, "config.name and config.map", id="config-both"),
    pytest.param({"config": {"map": {"a": "version: v1", "b": "version: v1"}}}, "set config.default",
                 id="config-ambiguous"),
    pytest.param({"config": {"map": {"default": "version: v1", "b": "version: v1"}, "fallbackStrategies": []}},
                 "the fallbacks now are []", id="config-no-fallbacks"),
    pytest.param({"config": {"map": {"a": "x"}, "fallbackStrategies": ["first"]}}, "fallbackStrategies",
                 id="config-unknown-fallback"),
    pytest.param({"config": {"map": {"a": "x"}, "default": "b"}}, "not a key of config.map", id="config-bad-default"),
    pytest.param({"probes": {"enabled": True}}, "needs metrics.enabled", id="probes-without-metrics"),
    pytest.param({"legacyDaemonsetAPI": True}, "no longer serves", id="legacy-on-new-cluster"),
    pytest.param({"nfd": {"enabled": True}}, "Install NFD yourself", id="nfd"),
]


@pytest.mark.parametrize("helm_name", HELM_NAMES)
@pytest.mark.parametrize(("values", "message"), REJECTED)
def test_rejected(helm_name: str, values: dict[str, Any], message: str, tmp_path: Path) -> None:
    result = template(helm_name, values_args(tmp_path, values))
    assert result.returncode != 0, result.stdout
    assert message in result.stderr


# ---------------------------------------------------------------------------------------------
# Docs


def _leaf_keys(values: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in {"affinity", "updateStrategy", "liveness", "readiness"}:
            keys |= _leaf_keys(value, f"{path}.")
        else:
            keys.add(path)
    return keys


def test_every_value_is_documented() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    doc = (ROOT / "docs" / "deployment.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)`", doc, flags=re.MULTILINE))
    assert _leaf_keys(values) <= documented, _leaf_keys(values) - documented


def test_seed_values_file_keeps_its_meaning(render: Any) -> None:
    seed = yaml.safe_load((FIXTURES / "seed-v0.9.0-values.yaml").read_text())
    ds = plugin_daemonset(render("helm4", Case(files=("seed-v0.9.0-values.yaml",))))
    pod = ds["spec"]["template"]["spec"]
    ctr = plugin_container(ds)
    assert ds["apiVersion"] == "apps/v1"
    assert ctr["image"] == f"{seed['image']['repository']}:v{__version__}"
    assert pod["imagePullSecrets"] == seed["imagePullSecrets"]
    assert pod["nodeSelector"] == seed["nodeSelector"]
    assert pod["tolerations"] == seed["tolerations"]
    # Helm merges maps: `affinity: {}` keeps the chart's default, as with the official chart since v0.12.
    assert pod["affinity"] == OFFICIAL_AFFINITY
    assert ctr["resources"] == seed["resources"]
    assert ds["spec"]["updateStrategy"] == seed["updateStrategy"]


# ---------------------------------------------------------------------------------------------
# Per-node configs: the config-manager init container and sidecar (docs/configuration.md)

OFFICIAL_CONFIG = {"config": {"map": {"default": "version: v1\n", "sliced": CONFIG_DEFAULT}, "default": "",
                              "fallbackStrategies": ["named", "single"]}}
# The official chart's config-manager env (daemonset-device-plugin.yml), name for name.
COMMON_ENV = {"KUBECONFIG": "", "NODE_NAME": "fieldRef:spec.nodeName", "NODE_LABEL": "nvidia.com/device-plugin.config",
              "CONFIG_FILE_SRCDIR": "/available-configs", "CONFIG_FILE_DST": "/config/config.yaml",
              "DEFAULT_CONFIG": "", "FALLBACK_STRATEGIES": "named,single"}
INIT_ENV = {"ONESHOT": "true", **COMMON_ENV, "SEND_SIGNAL": "false", "SIGNAL": "", "PROCESS_TO_SIGNAL": ""}
SIDECAR_ENV = {"ONESHOT": "false", **COMMON_ENV, "SEND_SIGNAL": "true", "SIGNAL": "1",
               "PROCESS_TO_SIGNAL": "nvidia-device-plugin"}


@pytest.mark.parametrize("helm_name", HELM_NAMES)
def test_the_official_config_values_give_the_official_pod(render: Any, helm_name: str) -> None:
    ds = plugin_daemonset(render(helm_name, Case(OFFICIAL_CONFIG)))
    pod = ds["spec"]["template"]["spec"]
    init = container(ds, "nvidia-device-plugin-init", init=True)
    sidecar = container(ds, "nvidia-device-plugin-sidecar")
    assert pod["shareProcessNamespace"] is True
    assert pod["serviceAccountName"] == f"{RELEASE}-nvidia-device-plugin-service-account"
    assert [c["name"] for c in pod["containers"]] == ["nvidia-device-plugin-sidecar", "nvidia-device-plugin-ctr"]
    assert init["command"] == sidecar["command"] == ["config-manager"]
    assert init["image"] == sidecar["image"] == plugin_container(ds)["image"]
    assert env_of(init) == INIT_ENV and env_of(sidecar) == SIDECAR_ENV
    assert env_of(plugin_container(ds))["CONFIG_FILE"] == "/config/config.yaml"
    mounts = {m["name"]: m["mountPath"] for m in plugin_container(ds)["volumeMounts"]}
    assert (mounts["available-configs"], mounts["config"]) == ("/available-configs", "/config")
    for c in (init, sidecar):
        assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]} == {
            "available-configs": "/available-configs", "config": "/config",
            "kube-api-access": "/var/run/secrets/kubernetes.io/serviceaccount"}
        assert c["securityContext"] == RESTRICTED and not c["securityContext"].get("privileged")
    assert "kube-api-access" not in mounts  # the plugin itself gets no API token
    assert pod["automountServiceAccountToken"] is False


def test_nvdp_reads_the_config_manager_env_as_meant(render: Any) -> None:
    ds = plugin_daemonset(render("helm4", Case({**OFFICIAL_CONFIG, "config": {**OFFICIAL_CONFIG["config"],
                                                                              "default": "sliced"}})))
    for name, init, oneshot, signal in (("nvidia-device-plugin-init", True, True, False),
                                        ("nvidia-device-plugin-sidecar", False, False, True)):
        env = env_of(container(ds, name, init=init))
        env["NODE_NAME"] = "gpu-node-1"  # the downward API's value
        s = load_manager_settings({}, env)
        assert (s.oneshot, s.send_signal, s.signal, s.process_to_signal) == (
            oneshot, signal, 1, "nvidia-device-plugin")
        assert (s.default_config, s.fallbacks, s.srcdir, s.dst, s.kubeconfig) == (
            "sliced", ("named", "single"), "/available-configs", "/config/config.yaml", "")
    known = {o.env for o in MANAGER_OPTIONS}
    assert set(env_of(container(ds, "nvidia-device-plugin-sidecar"))) <= known


def test_the_rbac_is_what_the_config_manager_needs_and_no_more(render: Any) -> None:
    docs = render("helm4", Case(OFFICIAL_CONFIG))
    granted = set()
    for kind in ("ClusterRole", "Role"):
        role = only(docs, kind)
        namespace = role["metadata"].get("namespace")
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.add((group, resource, frozenset(rule["verbs"]), namespace))
    assert granted == {(r.group, r.resource, r.verbs, r.namespace) for r in CONFIG_MANAGER_RULES}
    account = only(docs, "ServiceAccount")["metadata"]
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        binding = only(docs, kind)
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                        "namespace": account["namespace"]}]
        assert binding["roleRef"]["name"] == only(docs, kind.replace("Binding", ""))["metadata"]["name"]


def granted_rules(docs: list[dict[str, Any]]) -> set[tuple[str, str, frozenset[str], str | None]]:
    granted = set()
    for role in (d for d in docs if d["kind"] in ("ClusterRole", "Role")):
        namespace = role["metadata"].get("namespace")
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.add((group, resource, frozenset(rule["verbs"]), namespace))
    return granted


def test_cluster_health_gets_its_rbac_and_a_token_only_in_the_plugin(render: Any) -> None:
    rules = {(r.group, r.resource, r.verbs, r.namespace) for r in CLUSTER_HEALTH_RULES}
    docs = render("helm4", Case({"clusterHealth": {"enabled": True}}))
    assert granted_rules(docs) == rules
    pod = plugin_daemonset(docs)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == only(docs, "ServiceAccount")["metadata"]["name"]
    assert "shareProcessNamespace" not in pod and pod["automountServiceAccountToken"] is False
    mounts = {m["name"]: m["mountPath"] for m in plugin_container(plugin_daemonset(docs))["volumeMounts"]}
    assert mounts["kube-api-access"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    assert "serviceAccountToken" in str(_volume(pod, "kube-api-access"))
    both = render("helm4", Case({"clusterHealth": {"enabled": True}, **OFFICIAL_CONFIG}))
    assert granted_rules(both) == rules | {(r.group, r.resource, r.verbs, r.namespace) for r in CONFIG_MANAGER_RULES}
    assert [v["name"] for v in plugin_daemonset(both)["spec"]["template"]["spec"]["volumes"]].count(
        "kube-api-access") == 1


def test_cluster_health_is_off_by_default(render: Any) -> None:
    env = env_of(plugin_container(plugin_daemonset(render("helm4", Case()))))
    assert "NVDP_CLUSTER_HEALTH" not in env and "NODE_NAME" not in env


def test_no_config_no_config_manager(render: Any) -> None:
    docs = render("helm4", Case())
    pod = plugin_daemonset(docs)["spec"]["template"]["spec"]
    assert "initContainers" not in pod and "shareProcessNamespace" not in pod and "serviceAccountName" not in pod
    assert [c["name"] for c in pod["containers"]] == ["nvidia-device-plugin-ctr"]
    assert {d["kind"] for d in docs} == {"DaemonSet"}


@pytest.mark.parametrize(
    ("fallbacks", "keys", "renders"),
    [
        pytest.param(["named"], ["default", "b"], True, id="named finds default"),
        pytest.param(["single"], ["only"], True, id="single finds the only key"),
        pytest.param(["empty"], ["a", "b"], True, id="empty always resolves"),
        pytest.param(["named", "single"], ["a", "b"], False, id="nothing resolves"),
        pytest.param([], ["default"], False, id="no fallbacks, no default"),
    ],
)
def test_the_official_default_rule(fallbacks: list[str], keys: list[str], renders: bool, tmp_path: Path) -> None:
    values = {"config": {"map": {k: "version: v1\n" for k in keys}, "fallbackStrategies": fallbacks}}
    result = template("helm4", values_args(tmp_path, values))
    assert (result.returncode == 0) == renders, result.stderr
    if not renders:
        assert "set config.default" in result.stderr


def test_the_linked_config_follows_the_label(render: Any) -> None:
    docs = render("helm4", Case(OFFICIAL_CONFIG))
    assert _linked_config(docs) == {"/config/config.yaml": "version: v1"}  # named: "default"
    assert _linked_config(docs, "sliced") == {"/config/config.yaml": CONFIG_DEFAULT.rstrip("\n")}


def test_config_manager_metrics(render: Any) -> None:
    docs = render("helm4", Case({**OFFICIAL_CONFIG, "metrics": {"enabled": True, "serviceMonitor": {"enabled": True}}}))
    sidecar = container(plugin_daemonset(docs), "nvidia-device-plugin-sidecar")
    assert env_of(sidecar)["NVDP_CONFIG_MANAGER_METRICS_ADDRESS"] == "0.0.0.0:9402"
    assert sidecar["ports"] == [{"name": "cm-metrics", "containerPort": 9402, "protocol": "TCP"}]
    assert [p["name"] for p in only(docs, "Service")["spec"]["ports"]] == ["metrics", "cm-metrics"]
    assert [e["port"] for e in only(docs, "ServiceMonitor")["spec"]["endpoints"]] == ["metrics", "cm-metrics"]
    for doc in docs:
        validate(doc)


def test_notes_explain_the_label(tmp_path: Path) -> None:
    result = run_helm("helm4", "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                      *values_args(tmp_path, OFFICIAL_CONFIG))
    assert result.returncode == 0, result.stderr
    assert "kubectl label node NODE nvidia.com/device-plugin.config=NAME" in result.stdout
    assert "nvdp has no config-manager" not in result.stdout


# ---------------------------------------------------------------------------------------------
# MPS: the control daemon's DaemonSet, and the plugin's /mps and /dev/shm

MPS_VALUES = {"config": {"map": {"default": CONFIG_MPS}}}


def _volume(pod: Mapping[str, Any], name: str) -> dict[str, Any]:
    return dict(next(v for v in pod["volumes"] if v["name"] == name))


def _mount(container: Mapping[str, Any], name: str) -> dict[str, Any]:
    return dict(next(m for m in container["volumeMounts"] if m["name"] == name))


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({}, id="no config file"),
        pytest.param({"config": {"map": {"default": CONFIG_DEFAULT}}}, id="a config file without mps"),
        pytest.param({"config": {"map": {"default": "version: v1\nflags:\n  mpsRoot: /x\n"}}}, id="mpsRoot is not mps"),
        pytest.param({"config": {"map": {"default": "version: v1\n", "sliced": CONFIG_DEFAULT}}},
                     id="no named config with mps"),
    ],
)
def test_no_mps_daemon_where_mps_cannot_be_on(render: Any, values: dict[str, Any]) -> None:
    docs = render("helm4", Case(values))
    assert mps_daemonset(docs) is None
    ctr = plugin_container(plugin_daemonset(docs))
    assert "MPS_ROOT" not in env_of(ctr)
    assert not {"mps-root", "mps-shm"} & {m["name"] for m in ctr.get("volumeMounts", [])}


def test_the_mps_control_daemon_daemonset(render: Any) -> None:
    docs = render("helm4", Case(MPS_VALUES))
    ds = mps_daemonset(docs)
    assert ds is not None
    plugin = plugin_daemonset(docs)
    assert ds["metadata"]["name"] == f"{RELEASE}-nvidia-device-plugin-mps-control-daemon"
    assert ds["metadata"]["namespace"] == NAMESPACE
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/mps.capable": "true"}
    assert pod["hostPID"] is True and "shareProcessNamespace" not in pod
    assert pod["priorityClassName"] == "system-node-critical" and pod["automountServiceAccountToken"] is False
    assert pod["tolerations"] == plugin["spec"]["template"]["spec"]["tolerations"]
    assert [c["name"] for c in pod["initContainers"]] == ["mps-control-daemon-mounts", "mps-control-daemon-init"]
    init = container(ds, "mps-control-daemon-mounts", init=True)
    assert init["command"] == ["mps-control-daemon", "mount-shm"] and init["securityContext"] == {"privileged": True}
    assert init["volumeMounts"] == [{"name": "mps-root", "mountPath": "/mps", "mountPropagation": "Bidirectional"}]
    assert [c["name"] for c in pod["containers"]] == ["mps-control-daemon-sidecar", "mps-control-daemon-ctr"]
    ctr = container(ds, "mps-control-daemon-ctr")
    assert ctr["command"] == ["mps-control-daemon"] and ctr["securityContext"] == {"privileged": True}
    assert ctr["image"] == plugin_container(plugin)["image"] == init["image"]
    assert _mount(ctr, "mps-root") == {"name": "mps-root", "mountPath": "/mps"}
    assert _mount(ctr, "mps-shm") == {"name": "mps-shm", "mountPath": "/dev/shm"}
    assert _volume(pod, "mps-root") == {"name": "mps-root", "hostPath": {"path": "/run/nvidia/mps",
                                                                          "type": "DirectoryOrCreate"}}
    assert _volume(pod, "mps-shm") == {"name": "mps-shm", "hostPath": {"path": "/run/nvidia/mps/shm"}}
    assert "kube-api-access" not in {m["name"] for m in ctr["volumeMounts"]}  # no API token for the daemon
    env = env_of(ctr)
    assert env == {"CONFIG_FILE": "/config/config.yaml", **RUNTIME_ENV}
    # The daemon reads the config its own config-manager links (the same choice as the plugin's, for
    # every label), and finds the MPS root where it is mounted.
    for label in ("", "default"):
        files = _linked_config(docs, label, ds, "mps-control-daemon-init")
        assert files == _linked_config(docs, label)
        cfg = load({}, env, read_text=files.__getitem__, require_mps_root=False)
        assert cfg.sharing.strategy == "mps" and cfg.mps_dir == "/mps"
        assert cfg.config_file == env_of(plugin_container(plugin))["CONFIG_FILE"]
    validate(ds)


@pytest.mark.parametrize("helm_name", HELM_NAMES)
def test_the_mps_daemon_runs_the_config_manager_as_the_official_chart(render: Any, helm_name: str) -> None:
    """With a ConfigMap, the MPS control daemon's pod gets the same config-manager init container and
    sidecar as the plugin's (the official chart's names and env); the sidecar signals the daemon."""
    values = {"config": {"map": {"default": "version: v1\n", "shared": CONFIG_MPS}}}
    docs = render(helm_name, Case(values))
    ds = mps_daemonset(docs)
    assert ds is not None  # a named config other than the default may turn MPS on
    pod = ds["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == f"{RELEASE}-nvidia-device-plugin-service-account"
    assert pod["hostPID"] is True  # mps.enableHostPID: the sidecar sees the daemon in the host's PID namespace
    init, sidecar = container(ds, "mps-control-daemon-init", init=True), container(ds, "mps-control-daemon-sidecar")
    assert env_of(init) == INIT_ENV
    assert env_of(sidecar) == {**SIDECAR_ENV, "PROCESS_TO_SIGNAL": "/usr/bin/mps-control-daemon"}
    for c in (init, sidecar):
        assert c["command"] == ["config-manager"]
        assert c["image"] == container(ds, "mps-control-daemon-ctr")["image"]
        assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]} == {
            "available-configs": "/available-configs", "config": "/config",
            "kube-api-access": "/var/run/secrets/kubernetes.io/serviceaccount"}
        assert c["securityContext"] == RESTRICTED
    assert _volume(pod, "config") == {"name": "config", "emptyDir": {}}
    assert _volume(pod, "kube-api-access") == _volume(plugin_daemonset(docs)["spec"]["template"]["spec"],
                                                      "kube-api-access")
    # The plugin's pod and the daemon's follow the label alike: "shared" turns MPS on in both.
    assert _linked_config(docs, "shared", ds, "mps-control-daemon-init") == _linked_config(docs, "shared") == {
        "/config/config.yaml": CONFIG_MPS.rstrip("\n")}
    for doc in docs:
        validate(doc)


def test_the_two_daemonsets_select_only_their_own_pods(render: Any) -> None:
    for values in (MPS_VALUES, {**MPS_VALUES, "selectorLabelsOverride": {"name": "nvidia-device-plugin-ds"}}):
        docs = render("helm4", Case(values))
        plugin, ds = plugin_daemonset(docs), mps_daemonset(docs)
        assert ds is not None
        for owner, other in ((plugin, ds), (ds, plugin)):
            selector = owner["spec"]["selector"]["matchLabels"].items()
            assert selector <= owner["spec"]["template"]["metadata"]["labels"].items()
            assert not selector <= other["spec"]["template"]["metadata"]["labels"].items()


def test_the_plugin_sees_the_mps_root(render: Any) -> None:
    plugin = plugin_daemonset(render("helm4", Case({**MPS_VALUES, "mps": {"root": "/var/lib/nvidia-mps"}})))
    pod, ctr = plugin["spec"]["template"]["spec"], plugin_container(plugin)
    assert env_of(ctr)["MPS_ROOT"] == "/var/lib/nvidia-mps"
    assert _mount(ctr, "mps-root") == {"name": "mps-root", "mountPath": "/mps"}
    assert _mount(ctr, "mps-shm") == {"name": "mps-shm", "mountPath": "/dev/shm"}
    assert _volume(pod, "mps-root")["hostPath"] == {"path": "/var/lib/nvidia-mps", "type": "DirectoryOrCreate"}
    assert _volume(pod, "mps-shm")["hostPath"] == {"path": "/var/lib/nvidia-mps/shm"}
    cfg = load({}, env_of(ctr), read_text=lambda _: CONFIG_MPS)
    assert cfg.mps_root == "/var/lib/nvidia-mps" and cfg.mps_dir == _mount(ctr, "mps-root")["mountPath"]


def test_mps_values(render: Any) -> None:
    ds = mps_daemonset(render("helm4", Case({**MPS_VALUES, "mps": {"enableHostPID": False},
                                             "nodeSelector": {"pool": "gpu"}, "nvidiaDriverRoot": "/run/nvidia/driver",
                                             "migStrategy": "none", "logLevel": "debug"})))
    assert ds is not None
    pod = ds["spec"]["template"]["spec"]
    assert "hostPID" not in pod and pod["shareProcessNamespace"] is True
    assert pod["nodeSelector"] == {"pool": "gpu", "nvidia.com/mps.capable": "true"}
    ctr = container(ds, "mps-control-daemon-ctr")
    assert env_of(ctr) == {"CONFIG_FILE": "/config/config.yaml", "MIG_STRATEGY": "none",
                           "NVDP_LOG_LEVEL": "debug", "NVIDIA_DRIVER_ROOT": "/run/nvidia/driver", **RUNTIME_ENV}
    assert _mount(ctr, "driver-root") == {"name": "driver-root", "mountPath": "/driver-root", "readOnly": True}
    validate(ds)
