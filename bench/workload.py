"""Allocation quality over time: seeded pods arrive and leave on simulated nodes, and each arrival
asks a policy which free GPUs to give, as the kubelet asks GetPreferredAllocation.

Policies compared in the same run, on the same pods:
- `nvdp`: the plugin's own code path (`allocation.preferred` on the resource the plugin serves);
- `first-fit`: the free GPUs with the lowest indices;
- `optimum`: the highest-scoring set for this request alone, ties to the lowest indices (the same
  exact search as nvdp without its look-ahead);
- `official`: our emulation of the official plugin's best-effort policy (go-gpuallocator, see
  upstream-behaviour.md section 5: the best partition of all free GPUs into groups of the size
  asked, then its best group; size 1 takes the first free GPU in request order). It enumerates
  partitions, so it runs on nodes of up to 8 GPUs only.

Figures per (node, mix, policy), over the multi-GPU pods that got GPUs (a 1-GPU set has no pair,
so it always scores 0 = its best):
- `now`: mean of score / best score the free GPUs offered at the pod's arrival;
- `ideal`: mean of score / best score of that size on the empty node (what earlier choices cost);
- `below`: share of pods that got less than the best free set;
- `stranded`: share of pods that got no NVLink at all although the node has NVLink-connected sets
  of that size (so an earlier choice, or the policy, left it without);
- `rejected`: pods (of any size) that found too few free GPUs; the same for every policy, as all
  take the same number of GPUs at the same times.
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bench.harness import Figure, Settings
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.load import load
from nvdp.core import allocation
from nvdp.core.devices import Resource, Topology
from nvdp.core.resources import GPU_RESOURCE, build_tree
from nvdp.core.scoring import ScoreTable, bits

NODES = ("dgx1-v100", "dgx-h100", "pcie-l40s", "dgx2-v100")
OFFICIAL_MAX_GPUS = 8  # partitions of 16 GPUs into pairs alone number 2 million
TOLERANCE = 1e-9  # figures are means of the same ratios: equal choices give equal floats


@dataclass(frozen=True)
class Mix:
    """How big pods are and how they arrive. Sizes above the node's GPU count are not drawn."""

    name: str
    sizes: Mapping[int, float]  # size -> weight
    burst: tuple[int, int] = (1, 1)  # pods arriving together: uniform in [low, high]
    load: float = 0.9  # offered GPU-time / capacity: the node is busy, rarely idle


MIXES = (
    Mix("small", {1: 0.55, 2: 0.3, 4: 0.1, 8: 0.05}),
    Mix("large", {1: 0.1, 2: 0.2, 4: 0.4, 8: 0.3}),
    Mix("bursty", {1: 0.4, 2: 0.3, 4: 0.2, 8: 0.1}, burst=(2, 6)),
)


@dataclass(frozen=True)
class Pod:
    arrival: float
    duration: float
    size: int


def pods(mix: Mix, gpus: int, seed: int, count: int) -> list[Pod]:
    """A seeded arrival sequence: exponential gaps between bursts, exponential durations (mean 1)."""
    rng = random.Random(f"{mix.name}/{gpus}/{seed}")
    sizes = [s for s in mix.sizes if s <= gpus]
    weights = [mix.sizes[s] for s in sizes]
    mean_size = sum(s * w for s, w in zip(sizes, weights, strict=True)) / sum(weights)
    mean_burst = sum(mix.burst) / 2
    # Arrival rate of bursts so that the offered GPU-time per unit of time is load x capacity.
    rate = mix.load * gpus / (mean_size * mean_burst)
    out: list[Pod] = []
    now = 0.0
    while len(out) < count:
        now += rng.expovariate(rate)
        for _ in range(rng.randint(*mix.burst)):
            out.append(Pod(now, rng.expovariate(1.0), rng.choices(sizes, weights)[0]))
    return out[:count]


class Scene:
    """One simulated node as the plugin serves it, plus the reference figures per request size."""

    def __init__(self, profile: str) -> None:
        node = SimulatedBackend(profile).discover()
        self.profile = profile
        self.topology: Topology = node.topology
        self.resource: Resource = build_tree(node, load({"simulate": profile}, {}))[GPU_RESOURCE]
        self.ids = [d.id for d in self.resource.devices]
        self.table = ScoreTable(self.ids, self.topology)
        self.links = [[0 if a == b else self.topology.links(a, b) for b in self.ids] for a in self.ids]
        self.n = len(self.ids)
        everything = (1 << self.n) - 1
        self.ideal = {k: self.best(everything, k) for k in range(1, self.n + 1)}
        self.nvlink_sets = {k: self._nvlink_connected_exists(k) for k in range(2, self.n + 1)}

    def mask(self, ids: Sequence[str]) -> int:
        return self.table.mask(ids)

    def best(self, free: int, size: int) -> int:
        """The best score of any `size` GPUs in `free`, by plain enumeration (the reference)."""
        score = self.table.score
        return max(score(sum(c)) for c in itertools.combinations([1 << i for i in bits(free)], size))

    def has_nvlink(self, mask: int) -> bool:
        return any(self.links[a][b] for a, b in itertools.combinations(bits(mask), 2))

    def _nvlink_connected_exists(self, size: int) -> bool:
        """Whether some `size` GPUs are all joined through NVLink (checked by growing a component
        from each GPU: a connected graph of that size exists iff some component has >= size GPUs)."""
        links = self.links
        seen: set[int] = set()
        for start in range(self.n):
            if start in seen:
                continue
            component, todo = {start}, [start]
            while todo:
                a = todo.pop()
                for b in range(self.n):
                    if links[a][b] and b not in component:
                        component.add(b)
                        todo.append(b)
            seen |= component
            if len(component) >= size:
                return True
        return False


Policy = Callable[[list[str], int], list[str]]


def policies(scene: Scene) -> dict[str, Policy]:
    index = {d.id: i for i, d in enumerate(scene.resource.devices)}

    def nvdp(free: list[str], size: int) -> list[str]:
        return allocation.preferred(scene.resource, free, [], size, scene.topology)

    def first_fit(free: list[str], size: int) -> list[str]:
        return sorted(free, key=index.__getitem__)[:size]

    def optimum(free: list[str], size: int) -> list[str]:
        choice = allocation.optimal_sets(scene.table, scene.mask(free), 0, size)
        chosen = min(choice.masks, key=bits)  # lowest indices, no look-ahead
        return [scene.ids[i] for i in bits(chosen)]

    chosen: dict[str, Policy] = {"nvdp": nvdp, "first-fit": first_fit, "optimum": optimum}
    if scene.n <= OFFICIAL_MAX_GPUS:
        chosen["official"] = official_best_effort(scene)
    return chosen


def official_best_effort(scene: Scene) -> Policy:
    """The official allocator's choice, emulated from its documented behaviour (not its code)."""
    scores = scene.table.tabled()
    position = {u: i for i, u in enumerate(scene.ids)}

    def policy(free: list[str], size: int) -> list[str]:
        if size == 1:
            return free[:1]
        slots = [1 << position[u] for u in free] + [0] * (-len(free) % size)  # 0 = a padding slot
        pads = slots.count(0)
        best: list[tuple[int, ...]] = []
        best_total = -1

        def walk(left: list[int], groups: list[tuple[int, ...]], total: int) -> None:
            nonlocal best, best_total
            if len(left) == size:
                groups, total = [*groups, tuple(left)], total + scores[sum(left)]
                if total > best_total:  # the first partition found wins ties
                    best, best_total = groups, total
                return
            for others in itertools.combinations(left[1:], size - 1):
                group = (left[0], *others)
                if group.count(0) not in (0, pads):  # padding goes all into one group
                    continue
                rest = list(left[1:])
                for o in others:
                    rest.remove(o)
                walk(rest, [*groups, group], total + scores[sum(group)])

        walk(slots, [], 0)
        group = max(best, key=lambda g: scores[sum(g)])  # the first best group of that partition
        return [scene.ids[i] for i in bits(sum(group))]

    return policy


@dataclass
class Tally:
    """What one policy did over one or more replays."""

    arrived: int = 0
    rejected: int = 0
    multi: int = 0
    now: list[float] = field(default_factory=list)
    ideal: list[float] = field(default_factory=list)
    below: int = 0
    stranded: int = 0

    def add(self, other: Tally) -> None:
        self.arrived += other.arrived
        self.rejected += other.rejected
        self.multi += other.multi
        self.now += other.now
        self.ideal += other.ideal
        self.below += other.below
        self.stranded += other.stranded

    def row(self) -> dict[str, float]:
        multi = max(self.multi, 1)
        return {
            "now": statistics.fmean(self.now) if self.now else 1.0,
            "ideal": statistics.fmean(self.ideal) if self.ideal else 1.0,
            "below": self.below / multi,
            "stranded": self.stranded / multi,
            "rejected": self.rejected / max(self.arrived, 1),
            "multi_gpu_pods": self.multi,
            "pods": self.arrived,
        }


def replay(scene: Scene, arrivals: Sequence[Pod], policy: Policy, seed: int) -> Tally:
    """Play the pods in time order (departures first at equal times) and score every answer."""
    rng = random.Random(seed)  # the kubelet hands over the free IDs in no particular order
    tally = Tally()
    free = set(scene.ids)
    leaving: list[tuple[float, list[str]]] = []
    for pod in arrivals:
        leaving.sort(key=lambda item: item[0])
        while leaving and leaving[0][0] <= pod.arrival:
            free.update(leaving.pop(0)[1])
        tally.arrived += 1
        if len(free) < pod.size:
            tally.rejected += 1
            continue
        offered = sorted(free)
        rng.shuffle(offered)
        chosen = policy(offered, pod.size)
        if len(chosen) != pod.size or not set(chosen) <= free:
            raise AssertionError(f"{scene.profile}: policy answered {chosen} for {pod.size} of {offered}")
        if pod.size > 1:
            got, best = scene.table.score(scene.mask(chosen)), scene.best(scene.mask(offered), pod.size)
            tally.multi += 1
            tally.now.append(got / best if best else 1.0)
            tally.ideal.append(got / scene.ideal[pod.size] if scene.ideal[pod.size] else 1.0)
            tally.below += got < best
            tally.stranded += scene.nvlink_sets[pod.size] and not scene.has_nvlink(scene.mask(chosen))
        free.difference_update(chosen)
        leaving.append((pod.arrival + pod.duration, chosen))
    return tally


def compare(profile: str, mix: Mix, seeds: Sequence[int], count: int) -> dict[str, Tally]:
    """Every policy that runs on this node, on the same pods."""
    scene = Scene(profile)
    chosen = policies(scene)
    totals = {name: Tally() for name in chosen}
    for seed in seeds:
        arrivals = pods(mix, scene.n, seed, count)
        for name, policy in chosen.items():
            totals[name].add(replay(scene, arrivals, policy, seed))
    return totals


def verdict(rows: Mapping[str, Mapping[str, float]]) -> str:
    """nvdp against every other policy on `now` and `ideal` (higher is better) and `stranded`
    (lower): "beats all", "ties <policy>" (equal on all three), or "loses <metric> vs <policy>"."""
    ours = rows["nvdp"]
    lost, tied = [], []
    for b in (name for name in rows if name != "nvdp"):
        theirs = rows[b]
        margins = {
            "now": ours["now"] - theirs["now"],
            "ideal": ours["ideal"] - theirs["ideal"],
            "stranded": theirs["stranded"] - ours["stranded"],
        }
        lost += [f"{m} vs {b}" for m, d in margins.items() if d < -TOLERANCE]
        if all(abs(d) <= TOLERANCE for d in margins.values()):
            tied.append(b)
    if lost:
        return "loses " + ", ".join(lost)
    return "ties " + ", ".join(tied) if tied else "beats all"


SEEDS = range(10)
PODS_PER_SEED = 500


def run(settings: Settings) -> list[Figure]:
    seeds = range(settings.n(len(SEEDS), 1))
    count = settings.n(PODS_PER_SEED, 60)
    print(f"workload: {len(seeds)} seeds x {count} pods per node and mix; now/ideal/below/stranded over "
          "multi-GPU pods, rejected over all pods")
    print(f"{'node':<10} {'mix':<7} {'policy':<10} {'now':>6} {'ideal':>6} {'below':>6} {'strand':>6} "
          f"{'reject':>6}  verdict", flush=True)
    figures: list[Figure] = []
    for profile in NODES:
        for mix in MIXES:
            rows = {name: t.row() for name, t in compare(profile, mix, seeds, count).items()}
            result = verdict(rows)
            for name, r in rows.items():
                print(f"{profile:<10} {mix.name:<7} {name:<10} {r['now']:6.4f} {r['ideal']:6.4f} "
                      f"{r['below']:6.1%} {r['stranded']:6.1%} {r['rejected']:6.1%}"
                      + (f"  {result}" if name == "nvdp" else ""), flush=True)
            extra = {"rows": rows, "seeds": list(seeds), "pods_per_seed": count, "verdict": result}
            others = [r for name, r in rows.items() if name != "nvdp"]
            lead = max(r["ideal"] for r in others) - rows["nvdp"]["ideal"]
            strand = rows["nvdp"]["stranded"] - min(r["stranded"] for r in others)
            figures += [
                Figure(f"workload {profile}/{mix.name}: best baseline score/ideal - nvdp", "ratio", [lead],
                       goal=0.0, goal_stat="max", note=result, extra=extra),
                Figure(f"workload {profile}/{mix.name}: nvdp stranded - fewest baseline", "share", [strand],
                       goal=0.0, goal_stat="max", note=result),
            ]
    return figures
