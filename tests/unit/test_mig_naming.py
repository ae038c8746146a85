"""MIG profile and resource names against real profiles, computed with the official rounding."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvdp.core import mig
from nvdp.core.devices import GpuInfo, MigInfo
from nvdp.core.migprofiles import MODELS

FIXTURE = Path(__file__).parents[1] / "fixtures" / "nvidia-h200" / "nvml-snapshot.json"

H200_BYTES = 150754820096  # nvmlDeviceGetMemoryInfo.total on the fixture node
A100_40GB_BYTES = 40960 * 2**20
H100_80GB_BYTES = 81559 * 2**20


def gpu(memory_bytes: int) -> GpuInfo:
    return GpuInfo(index=0, uuid="GPU-0", minor=0, name="test", pci_bus_id="00000000:01:00.0",
                   memory_bytes=memory_bytes, compute_capability="9.0", mig_enabled=True)


def mig_info(memory_mb: int, profile_index: int, ci_slices: int | None = None) -> MigInfo:
    slices, attributes, neg = mig.GI_PROFILE_INDEXES[profile_index]
    return MigInfo(slot=0, uuid="MIG-0", gi_id=1, ci_id=0, gi_slices=slices, ci_slices=ci_slices or slices,
                   memory_mb=memory_mb, attributes=attributes, neg_attributes=neg)


# (parent bytes, MIG memory MiB as NVML reports it, NVML GI profile index, CI slices) -> names.
# H200 rows are the fixture's gpu_instance_profiles; A100/H100 rows are `nvidia-smi mig -lgip`
# memory from NVIDIA's MIG user guide (GiB with two decimals -> MiB).
REAL_PROFILES = [
    pytest.param(H200_BYTES, 16384, 0, None, "1g.18gb", "nvidia.com/mig-1g.18gb", id="H200 1g.18gb"),
    pytest.param(H200_BYTES, 16384, 7, None, "1g.18gb+me", "nvidia.com/mig-1g.18gb.me", id="H200 1g.18gb+me"),
    pytest.param(H200_BYTES, 33280, 9, None, "1g.35gb", "nvidia.com/mig-1g.35gb", id="H200 1g.35gb"),
    pytest.param(H200_BYTES, 33280, 1, None, "2g.35gb", "nvidia.com/mig-2g.35gb", id="H200 2g.35gb"),
    # 71424 MiB is 0.497 of the GPU -> 4/8 -> 0.5 * 141 GiB = 70.5, rounded half away from zero.
    pytest.param(H200_BYTES, 71424, 2, None, "3g.71gb", "nvidia.com/mig-3g.71gb", id="H200 3g.71gb"),
    pytest.param(H200_BYTES, 71424, 3, None, "4g.71gb", "nvidia.com/mig-4g.71gb", id="H200 4g.71gb"),
    pytest.param(H200_BYTES, 143360, 4, None, "7g.141gb", "nvidia.com/mig-7g.141gb", id="H200 7g.141gb"),
    pytest.param(A100_40GB_BYTES, 4864, 0, None, "1g.5gb", "nvidia.com/mig-1g.5gb", id="A100-40GB 1g.5gb"),
    pytest.param(A100_40GB_BYTES, 9856, 1, None, "2g.10gb", "nvidia.com/mig-2g.10gb", id="A100-40GB 2g.10gb"),
    pytest.param(A100_40GB_BYTES, 20096, 2, None, "3g.20gb", "nvidia.com/mig-3g.20gb", id="A100-40GB 3g.20gb"),
    pytest.param(A100_40GB_BYTES, 20096, 3, None, "4g.20gb", "nvidia.com/mig-4g.20gb", id="A100-40GB 4g.20gb"),
    pytest.param(A100_40GB_BYTES, 40448, 4, None, "7g.40gb", "nvidia.com/mig-7g.40gb", id="A100-40GB 7g.40gb"),
    pytest.param(H100_80GB_BYTES, 9984, 0, None, "1g.10gb", "nvidia.com/mig-1g.10gb", id="H100-80GB 1g.10gb"),
    pytest.param(H100_80GB_BYTES, 20096, 9, None, "1g.20gb", "nvidia.com/mig-1g.20gb", id="H100-80GB 1g.20gb"),
    pytest.param(H100_80GB_BYTES, 20096, 1, None, "2g.20gb", "nvidia.com/mig-2g.20gb", id="H100-80GB 2g.20gb"),
    pytest.param(H100_80GB_BYTES, 40448, 2, None, "3g.40gb", "nvidia.com/mig-3g.40gb", id="H100-80GB 3g.40gb"),
    pytest.param(H100_80GB_BYTES, 40448, 3, None, "4g.40gb", "nvidia.com/mig-4g.40gb", id="H100-80GB 4g.40gb"),
    pytest.param(H100_80GB_BYTES, 81152, 4, None, "7g.80gb", "nvidia.com/mig-7g.80gb", id="H100-80GB 7g.80gb"),
    # Variants: a smaller compute instance, no media extensions, graphics, all media extensions.
    pytest.param(A100_40GB_BYTES, 9856, 1, 1, "1c.2g.10gb", "nvidia.com/mig-1c.2g.10gb", id="1c.2g.10gb"),
    pytest.param(H100_80GB_BYTES, 40448, 2, 2, "2c.3g.40gb", "nvidia.com/mig-2c.3g.40gb", id="2c.3g.40gb"),
    pytest.param(H100_80GB_BYTES, 9984, 13, None, "1g.10gb-me", "nvidia.com/mig-1g.10gb-me", id="-me"),
    pytest.param(H100_80GB_BYTES, 20096, 11, None, "2g.20gb+gfx", "nvidia.com/mig-2g.20gb.gfx", id="+gfx"),
    pytest.param(H100_80GB_BYTES, 9984, 15, None, "1g.10gb+me.all", "nvidia.com/mig-1g.10gb.me.all",
                 id="+me.all"),
]


@pytest.mark.parametrize(("parent", "memory_mb", "index", "ci", "name", "resource"), REAL_PROFILES)
def test_profile_and_resource_names(
    parent: int, memory_mb: int, index: int, ci: int | None, name: str, resource: str
) -> None:
    profile = mig.profile_of(gpu(parent), mig_info(memory_mb, index, ci))
    assert str(profile) == name
    assert profile.resource_name == resource


def test_half_rounds_away_from_zero_like_go() -> None:
    # Python's round(70.5) is 70; the official plugin's math.Round gives 71 (3g.71gb on H200).
    assert round(70.5) == 70
    assert mig.memory_gb(H200_BYTES, 71424) == 71


def test_memory_gb_matches_the_formula_in_exact_arithmetic() -> None:
    # The reference formula written out with exact fractions, on every table row.
    def exact(parent: int, mb: int) -> int:
        eighths = math.ceil(Fraction(mb * 2**20, parent) * 8)
        total_gb = -(-parent // 2**30)
        return math.floor(Fraction(eighths, 8) * total_gb + Fraction(1, 2))

    for model in MODELS.values():
        for p in model.profiles:
            assert mig.memory_gb(model.memory_bytes, p.memory_mb) == exact(model.memory_bytes, p.memory_mb)


@given(parent=st.integers(2**30, 2**38), share=st.integers(1, 8))
def test_memory_gb_is_at_most_the_whole_gpu(parent: int, share: int) -> None:
    mb = parent * share // 8 // 2**20
    assert 0 <= mig.memory_gb(parent, mb) <= -(-parent // 2**30)


def test_unknown_parent_memory_falls_back_to_whole_gib() -> None:
    assert mig.memory_gb(0, 9984) == 10


@pytest.mark.parametrize("model", list(MODELS.values()), ids=list(MODELS))
def test_every_tabled_profile_is_named_as_nvml_names_it(model: object) -> None:
    from nvdp.core.migprofiles import GpuModel

    assert isinstance(model, GpuModel)
    for p in model.profiles:
        assert str(mig.profile_of(gpu(model.memory_bytes), mig_info(p.memory_mb, p.index))) == p.name


def test_h200_table_is_the_fixture() -> None:
    snapshot = json.loads(FIXTURE.read_text())
    device = snapshot["devices"][0]
    assert device["nvmlDeviceGetMemoryInfo"]["total"] == MODELS["NVIDIA H200"].memory_bytes
    real = {
        int(index): p for index, p in device["gpu_instance_profiles"].items() if "nvml_error" not in p
    }
    table = {p.index: p for p in MODELS["NVIDIA H200"].profiles}
    assert set(real) == set(table)
    for index, p in real.items():
        ours = table[index]
        assert (f"MIG {ours.name}", ours.id, ours.slices, ours.instances, ours.memory_mb) == (
            p["name"], p["id"], p["sliceCount"], p["instanceCount"], p["memorySizeMB"]
        )
        assert (ours.multiprocessors, ours.copy_engines, ours.decoders, ours.encoders, ours.jpegs, ours.ofas) == (
            p["multiprocessorCount"], p["copyEngineCount"], p["decoderCount"], p["encoderCount"],
            p["jpegCount"], p["ofaCount"],
        )
