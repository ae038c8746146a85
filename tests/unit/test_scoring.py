"""The official pair scores and the subset table that the exact search reads."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvdp.core.devices import PcieLevel, Topology
from nvdp.core.scoring import ScoreTable, bits, masks_of_size, pair_score, set_score, subset_scores


def pair(links: int = 0, level: PcieLevel | None = None) -> Topology:
    key = frozenset(("a", "b"))
    return Topology(nvlinks={key: links} if links else {}, pcie={key: level} if level is not None else {})


@pytest.mark.parametrize(
    ("topology", "expected"),
    [
        pytest.param(pair(level=PcieLevel.CROSS_CPU), 10, id="cross-cpu"),
        pytest.param(pair(level=PcieLevel.SAME_NUMA_NODE), 20, id="same-numa-node"),
        pytest.param(pair(level=PcieLevel.HOST_BRIDGE), 30, id="host-bridge"),
        pytest.param(pair(level=PcieLevel.MULTIPLE_SWITCHES), 40, id="multiple-switches"),
        pytest.param(pair(level=PcieLevel.SINGLE_SWITCH), 50, id="single-switch"),
        pytest.param(pair(level=PcieLevel.SAME_BOARD), 60, id="same-board"),
        pytest.param(pair(links=1), 100, id="one-nvlink-no-pcie-fact"),
        pytest.param(pair(links=2, level=PcieLevel.SINGLE_SWITCH), 250, id="nv2-and-switch"),
        pytest.param(pair(links=18, level=PcieLevel.SAME_NUMA_NODE), 1820, id="nvswitch-18"),
        pytest.param(pair(), 0, id="nothing-known"),
    ],
)
def test_pair_score_follows_the_official_table(topology: Topology, expected: int) -> None:
    assert pair_score(topology, "a", "b") == expected
    assert pair_score(topology, "b", "a") == expected


def test_set_score_sums_every_pair() -> None:
    ab, bc = frozenset("ab"), frozenset("bc")
    topology = Topology(nvlinks={ab: 2}, pcie={ab: PcieLevel.CROSS_CPU, bc: PcieLevel.SAME_BOARD})
    assert set_score(topology, "abc") == 210 + 60 + 0


def test_masks_of_size_lists_every_combination_once() -> None:
    for n in range(7):
        for k in range(n + 1):
            masks = masks_of_size(n, k)
            assert len(set(masks)) == len(masks)
            assert sorted(masks) == sorted(sum(1 << i for i in c) for c in itertools.combinations(range(n), k))


def test_bits_lists_positions_lowest_first() -> None:
    assert bits(0b101100) == [2, 3, 5]
    assert bits(0) == []


weights = st.integers(min_value=1, max_value=9).flatmap(
    lambda n: st.lists(st.integers(0, 1900), min_size=n * n, max_size=n * n).map(
        lambda flat: [[0 if i == j else flat[min(i, j) * n + max(i, j)] for j in range(n)] for i in range(n)]
    )
)


@given(weights)
@settings(max_examples=60, deadline=None)
def test_subset_table_equals_the_sum_over_pairs(matrix: list[list[int]]) -> None:
    n = len(matrix)
    table = subset_scores(matrix)
    assert len(table) == 2**n
    for mask in range(2**n):
        assert table[mask] == sum(matrix[a][b] for a, b in itertools.combinations(bits(mask), 2))


def test_score_table_without_subset_table_scores_by_pairs() -> None:
    uuids = [f"g{i}" for i in range(17)]  # one above TABLE_MAX_GPUS
    topology = Topology(nvlinks={frozenset(("g0", "g16")): 3}, pcie={})
    table = ScoreTable(uuids, topology)
    assert not table.exact
    assert table.score(table.mask(["g0", "g16", "g5"])) == 300
    assert table.gain(16, table.mask(["g0", "g1"])) == 300
    with pytest.raises(ValueError, match="17 GPUs"):
        table.tabled()
