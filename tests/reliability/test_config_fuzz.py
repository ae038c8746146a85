"""Generated config files and flag/env combinations: every valid one loads, every invalid one is
rejected with a ConfigError naming the field (the CLI turns it into exit code 2, documented in the
README), and nothing else ever escapes.

The strategies are derived from the OPTIONS table, so an option added there is fuzzed too. Most
examples run `nvdp.config.load` in-process; a few real `nvdp devices` runs check the exit code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nvdp.config.load import load
from nvdp.config.options import OPTIONS, Config, Option
from nvdp.errors import ConfigError

GO_BOOLS = ("1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False")
FILE = "/etc/nvdp/config.yaml"
# Options whose values are any text. Others with their own checks (health switches, periods) are
# not set in the generated combinations, whose validity this test must know; the arbitrary-file
# test still reaches them.
FREE_TEXT = {"driver_root", "dev_root", "kubelet_socket", "cdi_annotation_prefix", "nvidia_cdi_hook_path",
             "container_driver_root", "mps_root"}
WORD = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_./"), min_size=1, max_size=16)
# Options whose validity the OPTIONS table decides: booleans, choices, and the IMEX channel list.
CHECKED = [o for o in OPTIONS if o.kind == "bool" or o.choices or o.field == "imex_channel_ids"]
# Booleans with a rule across options (--cluster-health needs --node-name, --taint-on-fatal needs
# --cluster-health) are only set invalid, never in the valid combinations.
CROSS_CHECKED = {"cluster_health", "taint_on_fatal"}
FUZZED = [*(o for o in CHECKED if o.field not in CROSS_CHECKED), *(o for o in OPTIONS if o.field in FREE_TEXT)]
Sources = dict[str, dict[str, Any]]  # field -> {"cli" | "env" | "file": value}


def names_of(opt: Option) -> list[str]:
    """Every name a message may use for an option: the flag, an env var, or the file key and file."""
    return [f"invalid --{opt.flag}:", *(f"invalid --{a}:" for a in opt.aliases), *(f"invalid {e}:" for e in opt.envs),
            *([f"invalid {opt.file_key} in {FILE}:"] if opt.file_key else [])]


def valid_text(opt: Option) -> st.SearchStrategy[str]:
    """A valid value as a flag or env var gives it (text)."""
    if opt.kind == "bool":
        return st.sampled_from((*GO_BOOLS, ""))
    if opt.choices and opt.kind == "list":
        return st.lists(st.sampled_from(opt.choices), min_size=1, max_size=3, unique=True).map(",".join)
    if opt.choices:
        return st.sampled_from(opt.choices)
    if opt.kind == "intlist":
        return st.sampled_from(("", "0", " 0 "))
    return WORD


def valid_file_value(opt: Option) -> st.SearchStrategy[Any]:
    """A valid value as the config file gives it (typed YAML)."""
    if opt.kind == "bool":
        return st.booleans()
    if opt.choices and opt.kind == "list":
        items = st.lists(st.sampled_from(opt.choices), min_size=1, max_size=3, unique=True)
        return st.one_of(st.sampled_from(opt.choices), items)
    if opt.choices:
        return st.sampled_from(opt.choices)
    if opt.kind == "intlist":
        return st.sampled_from(([], [0]))
    return WORD


def bad_word(allowed: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.text(min_size=1, max_size=12).filter(lambda s: s.strip() not in allowed and "," not in s and s.strip())


def invalid_text(opt: Option) -> st.SearchStrategy[str]:
    if opt.kind == "bool":
        return st.text(max_size=8).filter(lambda s: s not in GO_BOOLS and s != "")
    if opt.choices and opt.kind == "list":
        good = st.lists(st.sampled_from(opt.choices), max_size=2)
        with_bad = st.tuples(good, bad_word(opt.choices)).map(lambda t: ",".join([*t[0], t[1]]))
        if not opt.default:  # an empty list is valid where it is the default (--cdi-feature-flags)
            return with_bad
        return st.one_of(with_bad, st.sampled_from(("", ",", " , ")))  # empty: nothing would reach the runtime
    if opt.choices:
        return bad_word(opt.choices)
    assert opt.kind == "intlist"
    # Blank text is an empty list (valid), so generated garbage needs one non-blank character.
    garbage = st.text(st.sampled_from("abc.x "), min_size=1).filter(lambda s: s.strip() != "")
    return st.one_of(st.sampled_from(("1", "0,0", "2,0", "-1")), garbage)


def invalid_file_value(opt: Option) -> st.SearchStrategy[Any]:
    wrong_type = st.one_of(st.integers(), st.dictionaries(WORD, WORD, min_size=1, max_size=2))
    if opt.kind == "bool":
        return st.one_of(wrong_type, st.sampled_from(("yes", "true", "1", [True])))
    if opt.choices and opt.kind == "list":
        bad_items = st.lists(bad_word(opt.choices), min_size=1, max_size=2)
        return st.one_of(wrong_type, bad_word(opt.choices), bad_items, st.just([]), st.just(""))
    if opt.choices:
        return st.one_of(wrong_type, bad_word(opt.choices), st.just([opt.choices[0]]))
    assert opt.kind == "intlist"
    return st.one_of(wrong_type, st.sampled_from(([1], [0, 0], ["0"], "0", [True])))


PRECEDENCE = ("cli", "env", "file")


def places_for(opt: Option) -> list[str]:
    return ["cli", *(["env"] if opt.envs else []), *(["file"] if opt.file_key else [])]


@st.composite
def valid_sources(draw: st.DrawFn) -> Sources:
    """Some options set, each from one or more of the CLI, an env var and the config file."""
    chosen: Sources = {}
    for opt in draw(st.lists(st.sampled_from(FUZZED), unique_by=lambda o: o.field, max_size=8)):
        places = draw(st.lists(st.sampled_from(places_for(opt)), min_size=1, unique=True))
        chosen[opt.field] = {
            place: draw(valid_file_value(opt) if place == "file" else valid_text(opt)) for place in places
        }
    return chosen


def winner(values: dict[str, Any]) -> tuple[str, Any]:
    place = next(p for p in PRECEDENCE if p in values)
    return place, values[place]


def resolve(sources: Sources) -> Config:
    cli: dict[str, Any] = {"config_file": FILE}
    env: dict[str, str] = {}
    doc: dict[str, Any] = {"version": "v1"}
    by_field = {o.field: o for o in OPTIONS}
    for field, values in sources.items():
        opt = by_field[field]
        for place, value in values.items():
            if place == "cli":
                cli[field] = [value] if opt.kind in ("list", "intlist") else value
            elif place == "env":
                env[opt.envs[0]] = value
            else:
                assert opt.file_key is not None
                node = doc
                *parents, leaf = opt.file_key.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
    text = yaml.safe_dump(doc)
    return load(cli, env, read_text=lambda path: text)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(valid_sources())
def test_valid_combinations_load(sources: Sources) -> None:
    cfg = resolve(sources)
    for opt in OPTIONS:
        if opt.choices:
            value = getattr(cfg, opt.field)
            assert all(v in opt.choices for v in (value if isinstance(value, tuple) else (value,)))
    for field, values in sources.items():  # CLI > env > file, whatever the mix
        opt = next(o for o in OPTIONS if o.field == field)
        if opt.choices and opt.kind == "str":
            assert getattr(cfg, field) == winner(values)[1]


@FUZZ
@given(valid_sources(), st.sampled_from(CHECKED), st.data())
def test_one_invalid_value_is_named(sources: Sources, opt: Option, data: st.DataObject) -> None:
    values = sources.setdefault(opt.field, {})
    place = winner(values)[0] if values else data.draw(st.sampled_from(places_for(opt)))
    values[place] = data.draw(invalid_file_value(opt) if place == "file" else invalid_text(opt))
    with pytest.raises(ConfigError) as info:
        resolve(sources)
    message = str(info.value)
    assert message.startswith("invalid ")
    # The first invalid value found may belong to this option or, if the draw made another one
    # invalid too, to that one: either way the message names a real option.
    named = [o for o in OPTIONS if any(n in message for n in names_of(o))]
    assert named, message
    assume(len(named) == 1)
    assert named[0].field == opt.field, message


YAML_KEYS = st.sampled_from((
    "version", "flags", "plugin", "sharing", "timeSlicing", "mps", "resources", "name", "replicas",
    "rename", "renameByDefault", "failRequestsGreaterThanOne", "devices", "imex", "channelIDs", "required",
    "migStrategy", "failOnInitError", "deviceListStrategy", "deviceIDStrategy", "passDeviceSpecs", "nvdp",
))
YAML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=10),
              st.sampled_from(("v1", "v2", "all", "nvidia.com/gpu", "gpu", "mixed", "envvar"))),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(YAML_KEYS, st.text(max_size=6)), inner, max_size=4)),
    max_leaves=20,
)


@FUZZ
@given(st.one_of(YAML_VALUES.map(lambda v: yaml.safe_dump(v)), st.text(max_size=80)))
def test_any_file_loads_or_is_rejected_by_name(text: str) -> None:
    try:
        load({"config_file": FILE}, {}, read_text=lambda path: text)
    except ConfigError as exc:
        assert str(exc).startswith("invalid ") and exc.field


# --- a few real runs of the CLI ----------------------------------------------------------------

def run_devices(args: list[str], env: dict[str, str], tmp_path: Path, file_text: str | None) -> tuple[int, str]:
    extra = []
    if file_text is not None:
        (tmp_path / "config.yaml").write_text(file_text)
        extra = [f"--config-file={tmp_path / 'config.yaml'}"]
    clean = {k: v for k, v in os.environ.items() if not any(k in o.envs for o in OPTIONS)}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "nvdp"), "devices", "--simulate", "dgx-h100", *extra, *args],
        env={**clean, **env}, capture_output=True, text=True, timeout=60,
    )
    return result.returncode, result.stderr


@pytest.mark.parametrize(
    ("args", "env", "file_text", "field"),
    [
        pytest.param(["--mig-strategy=both"], {}, None, "--mig-strategy", id="flag choice"),
        pytest.param(["--fail-on-init-error=maybe"], {}, None, "--fail-on-init-error", id="flag bool"),
        pytest.param([], {"IMEX_CHANNEL_IDS": "0,1"}, None, "IMEX_CHANNEL_IDS", id="env intlist"),
        pytest.param([], {"DEVICE_LIST_STRATEGY": "envvar,nope"}, None, "DEVICE_LIST_STRATEGY", id="env list"),
        pytest.param([], {}, "flags:\n  plugin:\n    passDeviceSpecs: yes please\n",
                     "flags.plugin.passDeviceSpecs", id="file bool"),
        pytest.param([], {}, "sharing:\n  timeSlicing:\n    resources: [{name: gpu, replicas: -3}]\n",
                     "sharing.timeSlicing.resources.0.replicas", id="file replicas"),
        pytest.param([], {}, "flags: {migStrategy: [", "--config-file", id="file not YAML"),
    ],
)
def test_cli_exits_2_naming_the_field(
    tmp_path: Path, args: list[str], env: dict[str, str], file_text: str | None, field: str
) -> None:
    code, stderr = run_devices(args, env, tmp_path, file_text)
    assert code == 2, stderr
    assert field in stderr
    assert "Traceback" not in stderr
    assert stderr.startswith("error: invalid ")
