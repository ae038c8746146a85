"""Switching from the official plugin without surprises (issue 12): what works under the official
plugin loads here too, and every mistake is one clear error naming what the operator wrote."""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from nvdp.backends.simulated.expand import build_node
from nvdp.backends.simulated.profile import builtin_profiles, load_profile
from nvdp.config.load import load
from nvdp.config.options import Config
from nvdp.core.devices import Resource
from nvdp.core.health import check_switches, settings_from
from nvdp.core.resources import plan_tree
from nvdp.errors import ConfigError
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet.server import device_message
from nvdp.ops.logs import JsonFormatter, TextFormatter

ROOT = Path(__file__).parents[2]
KUBELET_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the kubelet's gRPC receive limit for ListAndWatch
MAX_CONFIG_BYTES = 1024 * 1024  # a ConfigMap's limit
CONFIG = "/etc/nvdp/config.yaml"
# Wording of pydantic's own messages, which must never reach an operator.
PYDANTIC_WORDS = ("Input should", "instance of", "Field required", "Extra inputs", "[type=", "pydantic",
                  "valid dictionary")


def config_file(text: str, path: str = CONFIG) -> Any:
    def read(p: str) -> str:
        if p != path:
            raise FileNotFoundError(2, "No such file or directory", p)
        return text

    return read


def load_file(text: str, env: dict[str, str] | None = None, **cli: Any) -> Config:
    return load({"config_file": CONFIG, **cli}, env or {}, config_file(text))


def load_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_file(text)
    return info.value


# --- 1. DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS: a malformed entry is a warning ---------


@pytest.mark.parametrize(
    ("env", "ignored"),
    [
        pytest.param({"DP_DISABLE_HEALTHCHECKS": "foo"}, [("DP_DISABLE_HEALTHCHECKS", "foo")], id="disable=foo"),
        pytest.param({"DP_DISABLE_HEALTHCHECKS": "xids,foo"}, [("DP_DISABLE_HEALTHCHECKS", "foo")],
                     id="disable=xids,foo"),
        pytest.param({"DP_ENABLE_HEALTHCHECKS": "-1, 4.5,48"},
                     [("DP_ENABLE_HEALTHCHECKS", "-1"), ("DP_ENABLE_HEALTHCHECKS", "4.5")], id="enable=-1,4.5,48"),
        pytest.param({"DP_DISABLE_HEALTHCHECKS": "48;63"}, [("DP_DISABLE_HEALTHCHECKS", "48;63")],
                     id="wrong separator"),
    ],
)
def test_a_malformed_health_entry_is_a_warning_naming_it(
    caplog: pytest.LogCaptureFixture, env: dict[str, str], ignored: list[tuple[str, str]]
) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = load({}, env)  # no ConfigError: the official plugin starts with these
    warned = [(r.__dict__.get("source"), r.__dict__.get("value")) for r in caplog.records
              if r.getMessage() == "Ignoring malformed Xid value"]
    assert warned == ignored
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    settings_from(cfg)  # and the health settings build from it


def test_malformed_entries_are_ignored_and_the_rest_applies() -> None:
    xids = check_switches(["48", "abc", "-3"], []).xids
    assert not xids.acts_on(48) and xids.acts_on(79)


@pytest.mark.parametrize("word", ["all", "xids", " XIDS ", "xids,foo"])
def test_all_and_xids_disable_every_check_as_upstream(word: str) -> None:
    switches = settings_from(load({}, {"DP_DISABLE_HEALTHCHECKS": word})).switches
    assert (switches.events, switches.probes) == (False, False)


def test_a_malformed_entry_in_the_config_file_names_the_key_and_file(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        load_file("flags: {nvdp: {health: {disable: [48, oops]}}}")
    record = next(r for r in caplog.records if r.getMessage() == "Ignoring malformed Xid value")
    assert record.__dict__["source"] == f"flags.nvdp.health.disable in {CONFIG}"
    assert record.__dict__["value"] == "oops"


# --- 5. errors name the source the operator used ---------------------------------------------------


@pytest.mark.parametrize(
    ("cli", "env", "file", "field"),
    [
        pytest.param({}, {"MIG_STRATEGY": "foo"}, None, "MIG_STRATEGY", id="env"),
        pytest.param({"mig_strategy": "foo"}, {}, None, "--mig-strategy", id="flag"),
        pytest.param({}, {}, "flags: {migStrategy: mixd}", f"flags.migStrategy in {CONFIG}", id="file"),
        pytest.param({}, {}, "flags: {plugin: {deviceListStrategy: [envvar, cdi]}}",
                     f"flags.plugin.deviceListStrategy in {CONFIG}", id="file list"),
        pytest.param({}, {"DEVICE_LIST_STRATEGY": "envvar,mounts"}, None, "DEVICE_LIST_STRATEGY", id="env list"),
        pytest.param({}, {"NVDP_METRICS_ADDRESS": "9401"}, None, "NVDP_METRICS_ADDRESS", id="env address"),
        pytest.param({}, {}, "flags: {nvdp: {metricsAddress: nowhere}}", f"flags.nvdp.metricsAddress in {CONFIG}",
                     id="file address"),
        pytest.param({}, {"NVDP_HEALTH_QUIET_PERIOD": "-1"}, None, "NVDP_HEALTH_QUIET_PERIOD", id="env number"),
        pytest.param({}, {"IMEX_CHANNEL_IDS": "1"}, None, "IMEX_CHANNEL_IDS", id="env imex"),
        pytest.param({}, {}, "imex: {channelIDs: [3]}", f"imex.channelIDs in {CONFIG}", id="file imex"),
        pytest.param({}, {}, "flags: {failOnInitError: maybe}", f"flags.failOnInitError in {CONFIG}",
                     id="file bool"),
        pytest.param({}, {}, "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 1}]}}",
                     f"sharing.timeSlicing.resources.0.replicas in {CONFIG}", id="file sharing"),
        pytest.param({}, {"MIG_STRATEGY": "foo"}, "flags: {migStrategy: none}", "MIG_STRATEGY",
                     id="env over a good file"),
    ],
)
def test_errors_name_what_was_given(cli: dict[str, Any], env: dict[str, str], file: str | None, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        if file is None:
            load(cli, env)
        else:
            load_file(file, env, **cli)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(f"invalid {field}: ")


def test_a_config_file_error_names_the_file_once() -> None:
    message = str(load_error("flags: {migStrategy: mixd}"))
    assert message == (f"invalid flags.migStrategy in {CONFIG}: invalid strategy: 'mixd' "
                       "(allowed: none, single, mixed)")


# --- 9. logs: logfmt escaping, the config in the official names ---------------------------------


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt reader: key=value or key="quoted value" with \\" and \\\\ escapes."""
    pairs: dict[str, str] = {}
    for match in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|[^ "]*)(?= |$)', line):
        key, value = match.groups()
        if value.startswith('"'):
            value = json.loads(value)
        pairs[key] = value
    return pairs


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("nvdp.app", logging.ERROR, __file__, 1, "reload failed", None, None)
    rec.__dict__.update(extra)
    return rec


@pytest.mark.parametrize(
    "value",
    [
        'invalid allocation request for "nvidia.com/gpu": unknown device: x',
        "a\\b",
        'trailing quote"',
        "two\nlines",
        "k=v",
        "",
    ],
)
def test_logfmt_values_with_quotes_are_escaped(value: str) -> None:
    line = TextFormatter().format(record(error=value, resource="nvidia.com/gpu"))
    assert "\n" not in line
    tail = line.split(": reload failed ", 1)[1]
    assert parse_logfmt(tail) == {"error": value, "resource": "nvidia.com/gpu"}


def test_the_config_is_printed_in_the_official_v1_names() -> None:
    cfg = load_file("flags: {plugin: {passDeviceSpecs: true}}\nsharing:\n  timeSlicing:\n"
                    "    resources: [{name: nvidia.com/gpu, replicas: 4}]\n")
    v1 = cfg.to_v1()
    assert v1["version"] == "v1"
    assert v1["flags"]["migStrategy"] == "none"
    assert v1["flags"]["failOnInitError"] is True
    assert v1["flags"]["nvidiaDriverRoot"] == "/"
    assert v1["flags"]["plugin"]["passDeviceSpecs"] is True
    assert v1["flags"]["plugin"]["deviceListStrategy"] == ["envvar"]
    assert v1["flags"]["plugin"]["deviceIDStrategy"] == "uuid"
    assert v1["imex"] == {"channelIDs": [], "required": False}
    assert v1["sharing"]["timeSlicing"]["resources"] == [{"name": "nvidia.com/gpu", "replicas": 4}]
    text = json.dumps(v1)
    assert "mig_strategy" not in text and "pass_device_specs" not in text
    assert json.loads(cfg.to_json()) == v1


def test_running_with_config_is_an_object_in_json_logs() -> None:
    cfg = load({}, {})
    rec = logging.LogRecord("nvdp.app", logging.INFO, __file__, 1, "Running with config", None, None)
    rec.__dict__["config"] = cfg.to_v1()
    event = json.loads(JsonFormatter().format(rec))
    assert event["config"]["flags"]["migStrategy"] == "none"


# --- 10. inputs far too big -------------------------------------------------------------------------


def test_the_c_yaml_loader_is_used_when_present() -> None:
    from nvdp.backends.simulated import profile
    from nvdp.config import file

    expected = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader
    assert file.YAML_LOADER is expected and profile.YAML_LOADER is expected


def test_a_config_file_over_1_mib_is_refused_before_parsing(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("version: v1\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10))
    with pytest.raises(ConfigError) as info:
        load({"config_file": str(big)}, {})
    assert str(big) in str(info.value) and "1 MiB" in str(info.value)


def test_a_config_file_just_under_1_mib_loads(tmp_path: Path) -> None:
    fine = tmp_path / "fine.yaml"
    fine.write_text("version: v1\n" + "#" * (MAX_CONFIG_BYTES - 100) + "\n")
    assert load({"config_file": str(fine)}, {}).mig_strategy == "none"


def test_replicas_that_could_never_fit_are_refused_at_load() -> None:
    error = load_error("sharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 1000000}]}}")
    assert error.field == f"sharing.timeSlicing.resources.0.replicas in {CONFIG}"
    assert "1000000" in str(error) and str(KUBELET_MAX_MESSAGE_BYTES) in str(error)


def dgx_with_replicas(replicas: int) -> tuple[Any, Config]:
    label, profile = load_profile("dgx-h100")
    cfg = load_file(f"sharing: {{timeSlicing: {{resources: [{{name: nvidia.com/gpu, replicas: {replicas}}}]}}}}")
    return build_node(label, profile), cfg


def test_a_device_list_over_the_kubelet_limit_is_refused_when_planned() -> None:
    node, cfg = dgx_with_replicas(9000)
    with pytest.raises(ConfigError) as info:
        plan_tree(node, cfg)
    message = str(info.value)
    assert "nvidia.com/gpu" in message and "72000 devices" in message and str(KUBELET_MAX_MESSAGE_BYTES) in message


def test_a_device_list_under_the_limit_is_served() -> None:
    node, cfg = dgx_with_replicas(8000)
    assert len(plan_tree(node, cfg).tree["nvidia.com/gpu"].devices) == 64_000


@pytest.mark.parametrize("replicas", [2, 9, 10, 11, 100, 1234])
def test_the_list_size_is_what_protobuf_sends(replicas: int) -> None:
    from nvdp.core.limits import list_bytes

    node, cfg = dgx_with_replicas(replicas)
    for resource in plan_tree(node, cfg).tree.values():
        message = pb.ListAndWatchResponse(devices=[device_message(d) for d in resource.devices])
        assert list_bytes(resource.devices) == message.ByteSize()


def test_the_list_size_counts_unhealthy_and_numa_less_devices() -> None:
    from dataclasses import replace

    from nvdp.core.devices import Health
    from nvdp.core.limits import list_bytes

    label, profile = load_profile("h200")
    resource = next(iter(plan_tree(build_node(label, profile), load({}, {})).tree.values()))
    devices = tuple(replace(d, numa_node=None, health=Health.UNHEALTHY) for d in resource.devices)
    message = pb.ListAndWatchResponse(devices=[device_message(d) for d in Resource(resource.name, devices).devices])
    assert list_bytes(devices) == message.ByteSize()


# --- 11. simulated profiles ---------------------------------------------------------------------------


def profile_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        label, profile = load_profile(str(path))
        build_node(label, profile)
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        pytest.param("gpus:\n  - {uuid: GPU-1}\n  - {uuid: GPU-1}\n", ["gpus.1.uuid", "GPU-1", "gpus.0"],
                     id="duplicate uuid"),
        pytest.param("gpus:\n  - {pci_bus_id: '00000000:18:00.0'}\n  - {pci_bus_id: '00000000:18:00.0'}\n",
                     ["gpus.1.pci_bus_id", "00000000:18:00.0", "gpus.0"], id="duplicate bus id"),
        pytest.param("gpus:\n  - {pci_bus_id: '00000000:108:00.0'}\n", ["gpus.0.pci_bus_id", "108"],
                     id="bus id with three hex digits"),
        pytest.param("gpus:\n  - {pci_bus_id: 'pci-3b'}\n", ["gpus.0.pci_bus_id", "pci-3b"], id="not a bus id"),
        pytest.param("gpus:\n  - {count: 2, uuid: GPU-1}\n", ["gpus.0", "uuid", "count"], id="uuid with count 2"),
        pytest.param("defaults: {uuid: GPU-1}\ngpus:\n  - {}\n  - {}\n", ["uuid", "GPU-1"], id="uuid in defaults"),
        pytest.param("gpus:\n  - {uuid: GPU-1}\n  - {pci_bus_id: '00000000:18:00.0'}\n", ["pci_bus_id", "gpus.0"],
                     id="given bus id clashes with a generated one"),
        pytest.param("gpus:\n  - name: NVIDIA A100-SXM4-40GB\n    mig:\n      enabled: true\n      devices:\n"
                     "        - {profile: 1g.5gb, uuid: MIG-1}\n        - {profile: 1g.5gb, uuid: MIG-1}\n",
                     ["gpus.0.mig.devices.1.uuid", "MIG-1"], id="duplicate MIG uuid"),
    ],
)
def test_bad_profiles_are_refused_naming_the_field(tmp_path: Path, text: str, fragments: list[str]) -> None:
    message = profile_error(tmp_path, text)
    for fragment in fragments:
        assert fragment in message, message


BUS_ID = re.compile(r"[0-9A-F]{8}:[0-9A-F]{2}:[0-1][0-9A-F]\.[0-7]")


@pytest.mark.parametrize("name", builtin_profiles())
def test_every_builtin_profile_has_unique_valid_ids(name: str) -> None:
    node = build_node(*load_profile(name))
    uuids = [g.uuid for g in node.gpus] + [m.uuid for g in node.gpus for m in g.mig_devices]
    buses = [g.pci_bus_id for g in node.gpus]
    assert len(set(uuids)) == len(uuids) and len(set(buses)) == len(buses)
    assert all(BUS_ID.fullmatch(b) for b in buses), buses


def test_dgx2_gpu_15_has_a_valid_bus_id() -> None:
    node = build_node(*load_profile("dgx2-v100"))
    assert BUS_ID.fullmatch(node.gpus[15].pci_bus_id), node.gpus[15].pci_bus_id


# --- 12. config-file booleans: one rule, upstream's; no pydantic wording -----------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param("flags: {plugin: {passDeviceSpecs: 'true'}}", "flags.plugin.passDeviceSpecs", id="flag"),
        pytest.param("sharing: {timeSlicing: {renameByDefault: 'yes', resources: [{name: gpu, replicas: 2}]}}",
                     "sharing.timeSlicing.renameByDefault", id="renameByDefault yes"),
        pytest.param("sharing: {timeSlicing: {renameByDefault: 'true', resources: [{name: gpu, replicas: 2}]}}",
                     "sharing.timeSlicing.renameByDefault", id="renameByDefault 'true'"),
        pytest.param("sharing: {timeSlicing: {renameByDefault: 1, resources: [{name: gpu, replicas: 2}]}}",
                     "sharing.timeSlicing.renameByDefault", id="renameByDefault 1"),
        pytest.param("sharing: {timeSlicing: {failRequestsGreaterThanOne: 'true', "
                     "resources: [{name: gpu, replicas: 2}]}}",
                     "sharing.timeSlicing.failRequestsGreaterThanOne", id="failRequestsGreaterThanOne 'true'"),
    ],
)
def test_a_string_for_a_boolean_is_rejected_everywhere(text: str, field: str) -> None:
    error = load_error(text)
    assert error.field == f"{field} in {CONFIG}"
    assert "not a boolean" in str(error)


def test_real_booleans_still_load() -> None:
    cfg = load_file("sharing: {timeSlicing: {renameByDefault: true, failRequestsGreaterThanOne: false, "
                    "resources: [{name: gpu, replicas: 2}]}}")
    assert cfg.sharing.resources[0].rename == "nvidia.com/gpu.shared"


@pytest.mark.parametrize(
    "text",
    [
        "sharing: {timeSlicing: [1]}",
        "sharing: {timeSlicing: {resources: [gpu]}}",
        "sharing: {timeSlicing: {resources: {name: gpu}}}",
        "sharing: {timeSlicing: {resources: [{name: 7, replicas: 2}]}}",
        "sharing: {timeSlicing: {resources: [{name: gpu, replicas: two}]}}",
        "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 2.5}]}}",
        "sharing: 5",
        "flags: 5",
        "version: [v1]",
        "imex: [0]",
    ],
)
def test_config_file_errors_have_no_pydantic_wording(text: str) -> None:
    message = str(load_error(text))
    assert CONFIG in message
    assert not any(word in message for word in PYDANTIC_WORDS), message


@pytest.mark.parametrize(
    "text",
    [
        "gpus: [5]",
        "gpus: 5",
        "[1, 2]",
        "gpus: [{count: 0}]",
        "gpus: [{count: many}]",
        "gpus: [{colour: green}]",
        "gpus: [{mig: {enabled: 'yes'}}]",
        "gpus: [{}]\nnvlink: {pairs: [[0, 1]]}",
        "gpus: [{}]\nnvlink: {all_pairs: 40}",
        "description: 5\ngpus: [{}]",
    ],
)
def test_profile_errors_have_no_pydantic_wording(tmp_path: Path, text: str) -> None:
    message = profile_error(tmp_path, text)
    assert "simulated profile node" in message
    assert not any(word in message for word in PYDANTIC_WORDS), message


# --- 13. choices case-insensitive where upstream's are ------------------------------------------


@pytest.mark.parametrize(
    ("cli", "env", "level", "fmt"),
    [
        pytest.param({"log_level": "DEBUG"}, {}, "debug", "text", id="flag DEBUG"),
        pytest.param({}, {"NVDP_LOG_LEVEL": "Warning"}, "warning", "text", id="env Warning"),
        pytest.param({"log_format": "JSON"}, {}, "info", "json", id="flag JSON"),
    ],
)
def test_log_choices_are_case_insensitive(cli: dict[str, str], env: dict[str, str], level: str, fmt: str) -> None:
    cfg = load(cli, env)
    assert (cfg.log_level, cfg.log_format) == (level, fmt)


def test_the_official_choices_stay_exact() -> None:
    with pytest.raises(ConfigError, match="MIG_STRATEGY"):
        load({}, {"MIG_STRATEGY": "None"})


# --- 16. packaging: no setuptools deprecation banner, make demo installs the runtime only --------


def test_the_license_metadata_raises_no_deprecation_warning() -> None:
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), ROOT / "pyproject.toml")
    deprecations = [str(w.message) for w in caught if "Deprecat" in w.category.__name__]
    assert deprecations == []


def test_make_demo_installs_only_the_runtime_package(tmp_path: Path) -> None:
    import subprocess

    venv = tmp_path / "venv"
    dry_run = subprocess.run(["make", "-n", "demo", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    installs = [line for line in dry_run.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs and all("[dev" not in line and "mypy" not in line for line in installs), dry_run
    assert any(re.search(r"pip install .*-e '?\.'?(\s|$)", line) for line in installs), dry_run
