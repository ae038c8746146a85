"""Expand every built-in YAML profile through the schema (pydantic, PyYAML) into the
`profiles/<name>.json` that `--simulate NAME` reads (see builtin.py). `make profiles`
(scripts/compile-profiles) writes them; tests/unit/test_builtin_profiles.py checks that the
committed files are what this produces."""

from __future__ import annotations

import json
from pathlib import Path

from nvdp.backends.simulated.builtin import FORMAT, PROFILES_DIR, builtin_profiles, compiled_name, node_to_data
from nvdp.backends.simulated.expand import build_node
from nvdp.backends.simulated.profile import load_profile


def compiled_texts() -> dict[str, str]:
    """File name -> text, one per built-in profile."""
    texts = {}
    for name in builtin_profiles():
        label, profile = load_profile(name)
        record = {
            "format": FORMAT,
            "generated_from": f"{name}.yaml by `make profiles`: do not edit",
            "node": node_to_data(build_node(label, profile)),
            "mig_minors_missing": list(profile.mig_minors_missing),
        }
        texts[compiled_name(name)] = json.dumps(record, indent=1, sort_keys=True) + "\n"
    return texts


def write(folder: Path | None = None) -> int:
    """Write the files (into the package's profiles folder by default); returns how many."""
    target = folder or Path(PROFILES_DIR)
    texts = compiled_texts()
    for file, text in texts.items():
        (target / file).write_text(text)
    return len(texts)
