"""NVML link facts -> pair model (topology.build_topology), and the simulated profiles' topologies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.backends.simulated.expand import build_node
from nvdp.backends.simulated.profile import Profile
from nvdp.core.devices import GpuInfo, PcieLevel
from nvdp.core.topology import Far, NvLinkEnd, build_topology, bus_key
from nvdp.errors import ConfigError

BUS = ["00000000:18:00.0", "00000000:28:00.0", "00000000:38:00.0"]
SWITCH_BUS = "00000000:C1:00.0"


def gpus(n: int = 3) -> list[GpuInfo]:
    return [
        GpuInfo(index=i, uuid=f"GPU-{i}", minor=i, name="g", pci_bus_id=BUS[i], memory_bytes=1,
                compute_capability="9.0")
        for i in range(n)
    ]


def ends(*spec: tuple[int | str, Far]) -> list[NvLinkEnd]:
    """Far ends by GPU index (its bus id, lower-cased as sysfs spells it) or a literal bus id."""
    return [NvLinkEnd(BUS[t].lower() if isinstance(t, int) else t, far) for t, far in spec]


def links_of(links: Mapping[str, Sequence[NvLinkEnd]]) -> dict[tuple[int, int], int]:
    topology = build_topology(gpus(), links, {})
    return {(a, b): topology.links(f"GPU-{a}", f"GPU-{b}") for a in range(3) for b in range(a + 1, 3)}


G, S, CPU, U = Far.GPU, Far.SWITCH, Far.OTHER, Far.UNKNOWN


@pytest.mark.parametrize(
    ("links", "expected"),
    [
        pytest.param(
            {"GPU-0": ends((1, G), (1, G)), "GPU-1": ends((0, G), (0, G))},
            {(0, 1): 2, (0, 2): 0, (1, 2): 0},
            id="direct-two-links-seen-from-both-ends",
        ),
        pytest.param(
            {"GPU-0": ends((1, G), (1, G), (1, G)), "GPU-1": ends((0, G))},
            {(0, 1): 1, (0, 2): 0, (1, 2): 0},
            id="asymmetric-counts-the-side-with-fewer",
        ),
        pytest.param(
            {"GPU-0": ends((1, U)), "GPU-1": ends((0, U))},
            {(0, 1): 1, (0, 2): 0, (1, 2): 0},
            id="unknown-far-kind-but-a-gpu-address",
        ),
        pytest.param(
            {f"GPU-{i}": ends(*[(SWITCH_BUS, S)] * (6 if i else 4)) for i in range(3)},
            {(0, 1): 4, (0, 2): 4, (1, 2): 6},
            id="nvswitch-min-of-switch-links",
        ),
        pytest.param(
            {"GPU-0": ends((SWITCH_BUS, S), (1, G)), "GPU-1": ends((SWITCH_BUS, S), (0, G))},
            {(0, 1): 2, (0, 2): 0, (1, 2): 0},
            id="direct-plus-switch",
        ),
        pytest.param(
            {"GPU-0": ends((SWITCH_BUS, CPU), (SWITCH_BUS, U)), "GPU-1": ends((SWITCH_BUS, CPU), (SWITCH_BUS, U))},
            {(0, 1): 0, (0, 2): 0, (1, 2): 0},
            id="cpu-and-unknown-far-ends-not-counted",
        ),
        pytest.param(
            {"GPU-0": ends((0, G)), "GPU-1": ends()},
            {(0, 1): 0, (0, 2): 0, (1, 2): 0},
            id="loopback-ignored",
        ),
        pytest.param({}, {(0, 1): 0, (0, 2): 0, (1, 2): 0}, id="pcie-only"),
    ],
)
def test_build_topology(links: Mapping[str, Sequence[NvLinkEnd]], expected: dict[tuple[int, int], int]) -> None:
    assert links_of(links) == expected


def test_build_topology_keeps_pcie_levels() -> None:
    key = frozenset(("GPU-0", "GPU-2"))
    topology = build_topology(gpus(), {}, {key: PcieLevel.HOST_BRIDGE})
    assert topology.pcie_level("GPU-2", "GPU-0") is PcieLevel.HOST_BRIDGE
    assert topology.pcie_level("GPU-0", "GPU-1") is None


def test_bus_key_matches_nvml_and_sysfs_spellings() -> None:
    assert bus_key("00000000:3B:00.0") == bus_key("0000:3b:00.0") == "0000:3b:00.0"


def nvlink_matrix(profile: str) -> list[list[int]]:
    node = SimulatedBackend(profile).discover()
    return [[node.topology.links(a.uuid, b.uuid) if a != b else 0 for b in node.gpus] for a in node.gpus]


def test_dgx1_v100_is_the_hybrid_cube_mesh() -> None:
    m = nvlink_matrix("dgx1-v100")
    assert [sum(row) for row in m] == [6] * 8  # six NVLinks per V100
    assert [[b for b in range(8) if m[a][b] == 2] for a in range(8)] == [
        [3, 4], [2, 5], [1, 3], [0, 2], [0, 7], [1, 6], [5, 7], [4, 6]
    ]
    assert all(m[a][b] == 0 for a in range(4) for b in range(4, 8) if b != a + 4)


@pytest.mark.parametrize(
    ("profile", "gpus_", "links"),
    [
        pytest.param("dgx-h100", 8, 18, id="dgx-h100"),
        pytest.param("dgx2-v100", 16, 6, id="dgx2-v100"),
        pytest.param("pcie-l40s", 4, 0, id="pcie-l40s"),
    ],
)
def test_uniform_profiles(profile: str, gpus_: int, links: int) -> None:
    m = nvlink_matrix(profile)
    assert len(m) == gpus_
    assert all(m[a][b] == links for a in range(gpus_) for b in range(gpus_) if a != b)


def test_dgx2_pcie_tree() -> None:
    node = SimulatedBackend("dgx2-v100").discover()
    level = node.topology.pcie_level
    g = [x.uuid for x in node.gpus]
    assert level(g[0], g[1]) is PcieLevel.SINGLE_SWITCH
    assert level(g[0], g[3]) is PcieLevel.MULTIPLE_SWITCHES
    assert level(g[0], g[7]) is PcieLevel.SAME_NUMA_NODE
    assert level(g[0], g[8]) is PcieLevel.CROSS_CPU


@pytest.mark.parametrize(
    ("topology", "field", "message"),
    [
        pytest.param({"nvlink": {"pairs": [[0, 9, 1]]}}, "nvlink.pairs.0", "two different GPUs", id="gpu-out-of-range"),
        pytest.param({"nvlink": {"pairs": [[1, 1, 1]]}}, "nvlink.pairs.0", "two different GPUs", id="self-pair"),
        pytest.param({"pcie": {"pairs": [[0, 1, "pix"]]}}, "pcie.pairs.0", "'pix' is not one of", id="bad-level"),
    ],
)
def test_profile_topology_errors_name_the_field(topology: dict[str, object], field: str, message: str) -> None:
    profile = Profile.model_validate({"gpus": [{"count": 2}], **topology})
    with pytest.raises(ConfigError) as caught:
        build_node("custom", profile)
    assert field in str(caught.value)
    assert message in str(caught.value)


def test_profile_pair_with_zero_links_removes_an_all_pairs_link() -> None:
    profile = Profile.model_validate({"gpus": [{"count": 3}], "nvlink": {"all_pairs": 4, "pairs": [[0, 2, 0]]}})
    node = build_node("custom", profile)
    g = [x.uuid for x in node.gpus]
    assert (node.topology.links(g[0], g[1]), node.topology.links(g[0], g[2])) == (4, 0)
