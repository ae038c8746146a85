"""A tiny run of the workload benchmark (bench/workload.py), so `make test` exercises it."""

from __future__ import annotations

import pytest

from bench.harness import Settings
from bench.workload import MIXES, Scene, compare, pods, policies, replay, verdict


def test_pods_are_seeded_and_fit_the_node() -> None:
    small = MIXES[0]
    first, again = pods(small, 4, seed=1, count=50), pods(small, 4, seed=1, count=50)
    assert first == again
    assert pods(small, 4, seed=2, count=50) != first
    assert all(p.size <= 4 for p in first)
    assert [p.arrival for p in first] == sorted(p.arrival for p in first)


@pytest.mark.parametrize("profile", ["dgx1-v100", "pcie-l40s"])
def test_a_few_pods_replay_under_every_policy(profile: str) -> None:
    totals = compare(profile, MIXES[2], seeds=[0], count=40)
    rows = {name: t.row() for name, t in totals.items()}
    assert set(totals) == {"nvdp", "first-fit", "optimum", "official"}
    assert {t.arrived for t in totals.values()} == {40}
    assert len({t.rejected for t in totals.values()}) == 1  # same pods, same sizes, same times
    for name in ("nvdp", "optimum"):  # both are exact per request
        assert rows[name]["now"] == 1.0
        assert rows[name]["below"] == 0.0
    assert all(0 < r["ideal"] <= 1 for r in rows.values())
    assert verdict(rows).startswith(("beats all", "ties", "loses"))


def test_first_fit_is_scored_honestly() -> None:
    """First-fit on the cube-mesh: a 2-GPU pod on GPUs 0 and 1 scores 150 where 250 was free."""
    scene = Scene("dgx1-v100")
    chosen = policies(scene)["first-fit"]
    assert chosen(list(reversed(scene.ids)), 2) == scene.ids[:2]
    tally = replay(scene, [p for p in pods(MIXES[0], 8, 0, 30) if p.size == 2][:1], chosen, seed=0)
    assert tally.now == [150 / 250]


def test_quick_run_returns_one_figure_per_node_and_mix() -> None:
    from bench import workload

    figures = workload.run(Settings(quick=True))
    assert len(figures) == 2 * len(workload.NODES) * len(MIXES)
