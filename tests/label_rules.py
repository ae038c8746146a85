"""The format rules of GPU feature discovery's labels, per MIG strategy, for the label tests.

Written after the official GFD's expected-output files (tests/expected-output*.txt upstream: one
regex per `key=value` line for mig none, single and mixed, and the vGPU keys), with two changes:
value classes are real alternations (upstream's `[none|mps|time-slicing]` is a character class
that also accepts "x"), and products may hold digits and dots (upstream's mock product has none).
`check` demands that every label matches exactly one rule and that every required rule is met,
so a missing label fails as surely as a malformed one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

N = "[0-9]+"
BOOL = "(true|false)"
STRATEGY = "(none|mps|time-slicing)"
VALUE = "[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?"  # a Kubernetes label value, non-empty

VERSION_RULES = {
    "nvidia.com/cuda.driver.major": N,
    "nvidia.com/cuda.driver.minor": N,
    "nvidia.com/cuda.driver.rev": "[0-9]*",
    "nvidia.com/cuda.runtime.major": N,
    "nvidia.com/cuda.runtime.minor": N,
    "nvidia.com/cuda.driver-version.major": N,
    "nvidia.com/cuda.driver-version.minor": N,
    "nvidia.com/cuda.driver-version.revision": "[0-9]*",
    "nvidia.com/cuda.driver-version.full": r"[0-9]+\.[0-9]+(\.[0-9]+)?",
    "nvidia.com/cuda.runtime-version.major": N,
    "nvidia.com/cuda.runtime-version.minor": N,
    "nvidia.com/cuda.runtime-version.full": r"[0-9]+\.[0-9]+",
}

GPU_RULES = {
    "nvidia.com/gpu.machine": "([A-Za-z0-9_.-]*)",
    "nvidia.com/gpu.count": N,
    "nvidia.com/gpu.replicas": N,
    "nvidia.com/gpu.sharing-strategy": STRATEGY,
    "nvidia.com/gpu.product": VALUE,
    "nvidia.com/gpu.memory": N,
    "nvidia.com/gpu.family": "(tesla|fermi|kepler|maxwell|pascal|volta|turing|ampere|ada-lovelace|hopper"
                             "|blackwell|rubin|undefined)",
    "nvidia.com/gpu.mode": "(unknown|compute|graphics)",
    "nvidia.com/mig.capable": BOOL,
    "nvidia.com/gpu.compute.major": N,
    "nvidia.com/gpu.compute.minor": N,
    "nvidia.com/mps.capable": BOOL,
    "nvidia.com/vgpu.present": BOOL,
}

MIG_ATTRIBUTES = ("memory", "multiprocessors", "slices.gi", "slices.ci", "engines.copy", "engines.decoder",
                  "engines.encoder", "engines.jpeg", "engines.ofa")

TIMESTAMP_RULE = {"nvidia.com/gfd.timestamp": "[0-9]{10}"}
VGPU_HOST_RULES = {"nvidia.com/vgpu.host-driver-version": "[A-Za-z0-9_.-]*",
                   "nvidia.com/vgpu.host-driver-branch": "[A-Za-z0-9_.-]*"}
CLIQUE_RULE = {"nvidia.com/gpu.clique": "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\\.[0-9]+"}

# A mixed-strategy profile in a key: `mig-1g.10gb`, `mig-1c.3g.40gb`, `mig-1g.18gb.me` (`+` as `.`).
MIXED_PROFILE = r"mig-(?:[0-9]+c\.)?[0-9]+g\.[0-9]+gb(?:[.-](?:me|me\.all|gfx))?"


@dataclass(frozen=True)
class RuleSet:
    """Rules by key: `required` must all be present, `optional` may be; `per_profile` rules (for
    mixed) use `{p}` for a MIG profile and must all be present for each profile that appears."""

    required: Mapping[str, str]
    optional: Mapping[str, str] = field(default_factory=dict)
    per_profile: Mapping[str, str] = field(default_factory=dict)


def base(**overrides: str) -> dict[str, str]:
    return {**VERSION_RULES, **GPU_RULES, **overrides}


OPTIONAL = {**TIMESTAMP_RULE, **VGPU_HOST_RULES, **CLIQUE_RULE}

NONE = RuleSet(base(), OPTIONAL)
# single on a node without MIG-enabled GPUs: the none set plus the strategy.
SINGLE_NO_MIG = RuleSet(base(**{"nvidia.com/mig.strategy": "single"}), OPTIONAL)
SINGLE = RuleSet(
    base(**{
        "nvidia.com/mig.strategy": "single",
        "nvidia.com/gpu.product": VALUE + "-MIG-" + r"(?:[0-9]+c\.)?[0-9]+g\.[0-9]+gb[A-Za-z.]*(-SHARED)?",
        **{f"nvidia.com/gpu.{a}": N for a in MIG_ATTRIBUTES},
    }),
    OPTIONAL,
)
SINGLE_INVALID = RuleSet(
    base(**{
        "nvidia.com/mig.strategy": "single",
        "nvidia.com/gpu.product": VALUE + "-MIG-INVALID",
        "nvidia.com/gpu.count": "0",
        "nvidia.com/gpu.replicas": "0",
        "nvidia.com/gpu.sharing-strategy": "",
        "nvidia.com/gpu.memory": "0",
    }),
    OPTIONAL,
)
MIXED = RuleSet(
    base(**{"nvidia.com/mig.strategy": "mixed"}),
    OPTIONAL,
    {
        "nvidia.com/{p}.product": VALUE + "-MIG-" + r"[0-9a-z.]+(-SHARED)?",
        "nvidia.com/{p}.count": N,
        "nvidia.com/{p}.replicas": N,
        "nvidia.com/{p}.sharing-strategy": STRATEGY,
        **{f"nvidia.com/{{p}}.{a}": N for a in MIG_ATTRIBUTES},
    },
)


def check(labels: Mapping[str, str], rules: RuleSet) -> list[str]:
    """What is wrong with `labels` under `rules` (empty: they conform)."""
    problems: list[str] = []
    seen_profiles: dict[str, set[str]] = {}
    flat = {**rules.required, **rules.optional}
    per_profile = {re.escape(k).replace(r"\{p\}", f"({MIXED_PROFILE})"): v for k, v in rules.per_profile.items()}
    for key, value in labels.items():
        if key in flat:
            if not re.fullmatch(flat[key], value):
                problems.append(f"{key}={value} does not match {flat[key]}")
            continue
        for key_rule, value_rule in per_profile.items():
            match = re.fullmatch(key_rule, key)
            if match:
                seen_profiles.setdefault(match.group(1), set()).add(key_rule)
                if not re.fullmatch(value_rule, value):
                    problems.append(f"{key}={value} does not match {value_rule}")
                break
        else:
            problems.append(f"{key}={value}: no rule for this label")
    problems += [f"missing {key}" for key in rules.required if key not in labels]
    for profile, found in seen_profiles.items():
        problems += [f"missing {k} for {profile}" for k in per_profile if k not in found]
    return problems


def lines_to_labels(text: str) -> dict[str, str]:
    """The `key=value` lines of a feature file, checking each has one `=` after a key."""
    labels: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        assert sep and key, f"not a key=value line: {line!r}"
        assert key not in labels, f"{key} twice"
        labels[key] = value
    return labels


def profiles_in(labels: Mapping[str, str]) -> Sequence[str]:
    """The mixed-strategy profiles (`mig-1g.10gb`) that appear in the labels' keys."""
    found = {m.group(1) for k in labels if (m := re.fullmatch(rf"nvidia\.com/({MIXED_PROFILE})\.count", k))}
    return sorted(found)
