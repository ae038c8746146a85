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
from nvdp.kube.rbac import CONFIG_MANAGER_RULES
from tests.deploy.deploy_tools import (
    CHART,
    HELMS,
    NAMESPACE,
    RELEASE,
    ROOT,
    container,
    documents,
    env_of,
    only,
    plugin_container,
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
CONFIG_DEFAULT = "version: v1\nflags:\n  migStrategy: mixed\n  plugin:\n    deviceIDStrategy: index\n"

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
                      {"CONFIG_FILE": "/config/config.yaml", **MIG_ON}, SYS_ADMIN), id="config-external"),
    pytest.param(Case({"compatWithCPUManager": True, "securityContext": {"privileged": False, "runAsUser": 0}},
                      {"PASS_DEVICE_SPECS": "true"}, {"privileged": False, "runAsUser": 0}),
                 id="explicit-securityContext"),
    pytest.param(Case({"gdrcopyEnabled": True, "gdsEnabled": False, "mofedEnabled": True,
                       "deviceDiscoveryStrategy": "nvml", "nvidiaDevRoot": "/", "logLevel": "debug",
                       "cdi": {"nvidiaHookPath": "/opt/nvidia-cdi-hook", "featureFlags": ["a", "b"]},
                       "extraEnv": [{"name": "NVDP_EXTRA", "value": "1"}]},
                      {"GDRCOPY_ENABLED": "true", "GDS_ENABLED": "false", "MOFED_ENABLED": "true",
                       "DEVICE_DISCOVERY_STRATEGY": "nvml", "NVIDIA_DEV_ROOT": "/", "NVDP_LOG_LEVEL": "debug",
                       "NVIDIA_CDI_HOOK_PATH": "/opt/nvidia-cdi-hook", "CDI_FEATURE_FLAGS": "a,b",
                       "NVDP_EXTRA": "1"},
                      RESTRICTED,
                      {"gdrcopy_enabled": True, "gds_enabled": False, "mofed_enabled": True,
                       "device_discovery_strategy": "nvml", "dev_root": "/", "log_level": "debug",
                       "nvidia_cdi_hook_path": "/opt/nvidia-cdi-hook", "cdi_feature_flags": ("a", "b")}),
                 id="other-plugin-settings"),
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
    ds = only(render("helm4", case), "DaemonSet")
    ctr = plugin_container(ds)
    assert ctr["securityContext"] == case.security
    # privileged only when asked for, through compatWithCPUManager or an explicit securityContext
    if ctr["securityContext"].get("privileged"):
        assert case.values.get("compatWithCPUManager") and not case.values.get("securityContext")
    assert env_of(ctr) == {**case.env, **RUNTIME_ENV}
    assert ctr["command"] == ["nvidia-device-plugin"]


def _linked_config(docs: list[dict[str, Any]], label: str = "") -> dict[str, str]:
    """What /config/config.yaml holds once the init container ran: the rendered config-manager env
    and ConfigMap, resolved by nvdp's own selection (an external ConfigMap: a minimal file)."""
    ds = only(docs, "DaemonSet")
    if not ds["spec"]["template"]["spec"].get("initContainers"):
        return {}
    settings = load_manager_settings({}, env_of(container(ds, "nvidia-device-plugin-init", init=True)))
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
    env = env_of(plugin_container(only(docs, "DaemonSet")))
    files = _linked_config(docs)
    cfg = load({}, env, read_text=lambda p: files[p])
    for name, expected in case.config.items():
        assert getattr(cfg, name) == expected, name


def test_every_rendered_env_var_is_one_nvdp_or_the_runtime_reads(render: Any) -> None:
    known = {e for o in OPTIONS for e in o.envs} | set(RUNTIME_ENV) | {"NVIDIA_MIG_MONITOR_DEVICES"}
    for param in CASES:
        case = param.values[0]
        assert isinstance(case, Case)  # pytest types a parameter as object
        env = env_of(plugin_container(only(render("helm4", case), "DaemonSet")))
        extra = {e["name"] for e in case.values.get("extraEnv", [])}
        assert set(env) - extra <= known, param.id


# ---------------------------------------------------------------------------------------------
# Individual values


def _ds(render: Any, values: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
    return only(render("helm4", Case(dict(values), **kw)), "DaemonSet")


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
    assert "affinity" not in pod and "nodeSelector" not in pod  # as in the seed chart
    assert pod["automountServiceAccountToken"] is False


def test_only_the_kubelet_folder_is_mounted_by_default(render: Any) -> None:
    pod = _ds(render, {})["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "device-plugin", "hostPath": {
        "path": "/var/lib/kubelet/device-plugins", "type": "Directory"}}]


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
    pod = only(docs, "DaemonSet")["spec"]["template"]
    assert re.fullmatch(r"[0-9a-f]{64}", pod["metadata"]["annotations"]["checksum/config"])
    assert {"name": "available-configs", "configMap": {"name": cm["metadata"]["name"]}} in pod["spec"]["volumes"]
    assert {"name": "config", "emptyDir": {}} in pod["spec"]["volumes"]


def test_config_change_rolls_the_pods(render: Any) -> None:
    def checksum(text: str) -> str:
        ds = only(render("helm4", Case({"config": {"map": {"default": text}}})), "DaemonSet")
        return str(ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"])
    assert checksum("version: v1\n") != checksum(CONFIG_DEFAULT)


def test_external_config_map_is_not_rendered(render: Any) -> None:
    docs = render("helm4", Case({"config": {"name": "site-gpu-config", "default": "a100"}}))
    assert sorted(d["kind"] for d in docs) == ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "Role",
                                               "RoleBinding", "ServiceAccount"]
    volumes = only(docs, "DaemonSet")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "available-configs", "configMap": {"name": "site-gpu-config"}} in volumes


def test_metrics_service_monitor_and_probes(render: Any) -> None:
    docs = render("helm4", Case({"metrics": {"enabled": True, "serviceMonitor": {"enabled": True}},
                                 "probes": {"enabled": True}}))
    assert sorted(d["kind"] for d in docs) == ["DaemonSet", "Service", "ServiceMonitor"]
    ctr = plugin_container(only(docs, "DaemonSet"))
    assert ctr["ports"] == [{"name": "metrics", "containerPort": 9401, "protocol": "TCP"}]
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    service, monitor = only(docs, "Service"), only(docs, "ServiceMonitor")
    assert service["spec"]["ports"][0]["name"] == monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    pod_labels = only(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_metrics_and_probes_are_off_by_default(render: Any) -> None:
    docs = render("helm4", Case())
    ctr = plugin_container(only(docs, "DaemonSet"))
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
    pytest.param({"gfd": {"enabled": True}}, "does not deploy GPU feature discovery", id="gfd"),
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
    ds = only(render("helm4", Case(files=("seed-v0.9.0-values.yaml",))), "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    ctr = plugin_container(ds)
    assert ds["apiVersion"] == "apps/v1"
    assert ctr["image"] == f"{seed['image']['repository']}:v{__version__}"
    assert pod["imagePullSecrets"] == seed["imagePullSecrets"]
    assert pod["nodeSelector"] == seed["nodeSelector"]
    assert pod["tolerations"] == seed["tolerations"]
    assert "affinity" not in pod  # `affinity: {}` means none, as it did
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
    ds = only(render(helm_name, Case(OFFICIAL_CONFIG)), "DaemonSet")
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
    ds = only(render("helm4", Case({**OFFICIAL_CONFIG, "config": {**OFFICIAL_CONFIG["config"],
                                                                  "default": "sliced"}})), "DaemonSet")
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


def test_no_config_no_config_manager(render: Any) -> None:
    docs = render("helm4", Case())
    pod = only(docs, "DaemonSet")["spec"]["template"]["spec"]
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
    sidecar = container(only(docs, "DaemonSet"), "nvidia-device-plugin-sidecar")
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
