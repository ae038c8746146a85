"""The README's option table is the one the code would print: docs cannot drift from the flags."""

from __future__ import annotations

from pathlib import Path

from nvdp.config.options import options_markdown

ROOT = Path(__file__).parents[2]


def test_readme_lists_every_option() -> None:
    readme = (ROOT / "README.md").read_text()
    expected = options_markdown()
    assert expected in readme, (
        "README.md's option table is stale; replace it with the output of\n"
        "  python -c 'from nvdp.config import options_markdown; print(options_markdown())'"
    )


def test_readme_leads_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text()[:400]
    assert "make demo" in head and "make test" in head
