"""Pair and set scores between GPUs (the official allocator's table) and the per-node tables that
make an exact search over GPU sets cheap.

A pair of GPUs scores 100 points per NVLink between them plus the points of their PCIe relation;
a set scores the sum over its pairs. `ScoreTable` numbers a node's GPUs 0..n-1, writes a set as a
bitmask (bit i = GPU i) and, for nodes up to `TABLE_MAX_GPUS`, holds the score of every subset, so
scoring a candidate set is one list lookup. It is built once per topology (see `table_for`).
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

from nvdp.core.devices import PcieLevel, Topology

NVLINK_POINTS = 100  # per NVLink between the two GPUs
PCIE_POINTS: Mapping[PcieLevel, int] = {
    PcieLevel.SAME_BOARD: 60,
    PcieLevel.SINGLE_SWITCH: 50,
    PcieLevel.MULTIPLE_SWITCHES: 40,
    PcieLevel.HOST_BRIDGE: 30,
    PcieLevel.SAME_NUMA_NODE: 20,
    PcieLevel.CROSS_CPU: 10,
}
# 2**16 subset scores (0.5 MB) take ~10 ms to build; 2**20 would take ~0.2 s
# and a per-call scan of C(20, 10) sets would miss the latency goal, so bigger nodes go greedy.
TABLE_MAX_GPUS = 16


def pair_score(topology: Topology, a: str, b: str) -> int:
    level = topology.pcie_level(a, b)
    return NVLINK_POINTS * topology.links(a, b) + (PCIE_POINTS[level] if level is not None else 0)


def set_score(topology: Topology, uuids: Iterable[str]) -> int:
    """The score of a set by its definition (used as the reference by tests, bench and demo)."""
    return sum(pair_score(topology, a, b) for a, b in itertools.combinations(list(uuids), 2))


def bits(mask: int) -> list[int]:
    """The GPU positions in a mask, lowest first."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


@lru_cache(maxsize=64)
def masks_of_size(n: int, k: int) -> Sequence[int]:
    """Every k-subset of n GPUs as a mask. Independent of the topology, so shared by every table
    with n GPUs (C(16, 8) = 12870 masks take ~4 ms to list, once)."""
    return array("q", map(sum, itertools.combinations([1 << i for i in range(n)], k)))


def subset_scores(weights: Sequence[Sequence[int]]) -> list[int]:
    """The score of every subset of GPUs 0..n-1, indexed by mask.

    Built bit by bit: the subsets holding GPU b as their highest GPU score what they score
    without it plus the weights from b to the GPUs they hold (`row_sums`, built by doubling)."""
    scores = [0]
    for b, row in enumerate(weights):
        row_sums = [0]
        for i in range(b):
            w = row[i]
            row_sums += [s + w for s in row_sums]
        scores += [s + r for s, r in zip(scores, row_sums, strict=True)]
    return scores


class ScoreTable:
    """Scores of a node's GPUs, numbered by their position in `uuids`."""

    def __init__(self, uuids: Sequence[str], topology: Topology) -> None:
        self.uuids = tuple(uuids)
        self.position = {u: i for i, u in enumerate(self.uuids)}
        self.n = len(self.uuids)
        self.weights = [
            [0 if a == b else pair_score(topology, a, b) for b in self.uuids] for a in self.uuids
        ]
        # An array, not a list: 8 bytes a subset instead of ~36 (1 MB for 16 GPUs, not 5), for a
        # scan ~30% slower that still takes ~1 ms.
        self._scores = array("q", subset_scores(self.weights)) if self.n <= TABLE_MAX_GPUS else None

    @property
    def exact(self) -> bool:
        """Whether every subset score is tabled (the node is small enough for exact search)."""
        return self._scores is not None

    def tabled(self) -> Sequence[int]:
        """The score of every subset, indexed by mask (only on nodes with `exact` tables)."""
        if self._scores is None:
            raise ValueError(f"no subset table for {self.n} GPUs (more than {TABLE_MAX_GPUS})")
        return self._scores

    def mask(self, uuids: Iterable[str]) -> int:
        return sum(1 << self.position[u] for u in uuids)

    def score(self, mask: int) -> int:
        if self._scores is not None:
            return self._scores[mask]
        members = bits(mask)
        return sum(self.weights[a][b] for a, b in itertools.combinations(members, 2))

    def gain(self, position: int, mask: int) -> int:
        """What adding GPU `position` to the set `mask` adds to its score."""
        row = self.weights[position]
        return sum(row[i] for i in bits(mask))
