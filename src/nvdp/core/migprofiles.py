"""GPU-instance profiles of MIG-capable GPU models, as NVML reports them.

The simulator resolves MIG devices given by profile name (`1g.10gb`, `1c.3g.20gb`) against these
tables, and the tests check the naming rules against them. Sources:

- NVIDIA H200: the real node in the nvidia-h200 fixture (`nvmlDeviceGetGpuInstanceProfileInfo`
  for every profile index, driver 580.159.04; total memory 150754820096 bytes).
- NVIDIA A100-SXM4-40GB and H100 80GB HBM3: `nvidia-smi mig -lgip` as NVIDIA's MIG user guide
  prints it (memory given there in GiB with two decimals, here in MiB; engine counts as listed).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GiProfile:
    """One GPU-instance profile (`nvmlGpuInstanceProfileInfo_v2_t`)."""

    name: str  # NVML's name without the "MIG " prefix, e.g. "1g.18gb+me"
    index: int  # NVML_GPU_INSTANCE_PROFILE_* constant: carries the +me/-me/+gfx variant
    id: int  # the profile ID nvidia-smi shows (used to create instances)
    slices: int
    instances: int
    memory_mb: int
    multiprocessors: int
    copy_engines: int
    decoders: int
    encoders: int
    jpegs: int
    ofas: int


@dataclass(frozen=True)
class GpuModel:
    name: str  # as nvmlDeviceGetName reports it
    memory_bytes: int
    compute_capability: str
    profiles: tuple[GiProfile, ...]

    def profile(self, name: str) -> GiProfile | None:
        return next((p for p in self.profiles if p.name == name), None)


A100_SXM4_40GB = GpuModel(
    name="NVIDIA A100-SXM4-40GB",
    memory_bytes=40960 * 2**20,
    compute_capability="8.0",
    profiles=(
        #          name           idx  id sl inst  mem_mb  SM CE DEC ENC JPG OFA
        GiProfile("1g.5gb",        0, 19, 1, 7,  4864,  14, 1, 0, 0, 0, 0),
        GiProfile("1g.5gb+me",     7, 20, 1, 1,  4864,  14, 1, 1, 0, 1, 1),
        GiProfile("1g.10gb",       9, 15, 1, 4,  9856,  14, 1, 1, 0, 0, 0),
        GiProfile("2g.10gb",       1, 14, 2, 3,  9856,  28, 2, 1, 0, 0, 0),
        GiProfile("3g.20gb",       2,  9, 3, 2, 20096,  42, 3, 2, 0, 0, 0),
        GiProfile("4g.20gb",       3,  5, 4, 1, 20096,  56, 4, 2, 0, 0, 0),
        GiProfile("7g.40gb",       4,  0, 7, 1, 40448,  98, 7, 5, 0, 1, 1),
    ),
)

H100_80GB_HBM3 = GpuModel(
    name="NVIDIA H100 80GB HBM3",
    memory_bytes=81559 * 2**20,
    compute_capability="9.0",
    profiles=(
        GiProfile("1g.10gb",       0, 19, 1, 7,  9984,  16, 1, 1, 0, 1, 0),
        GiProfile("1g.10gb+me",    7, 20, 1, 1,  9984,  16, 1, 1, 0, 1, 1),
        GiProfile("1g.20gb",       9, 15, 1, 4, 20096,  26, 1, 1, 0, 1, 0),
        GiProfile("2g.20gb",       1, 14, 2, 3, 20096,  32, 2, 2, 0, 2, 0),
        GiProfile("3g.40gb",       2,  9, 3, 2, 40448,  60, 3, 3, 0, 3, 0),
        GiProfile("4g.40gb",       3,  5, 4, 1, 40448,  64, 4, 4, 0, 4, 0),
        GiProfile("7g.80gb",       4,  0, 7, 1, 81152, 132, 8, 7, 0, 7, 1),
    ),
)

H200 = GpuModel(
    name="NVIDIA H200",
    memory_bytes=150754820096,
    compute_capability="9.0",
    profiles=(
        GiProfile("1g.18gb",       0, 19, 1, 7,  16384,  16, 1, 1, 0, 1, 0),
        GiProfile("1g.18gb+me",    7, 20, 1, 1,  16384,  16, 1, 1, 0, 1, 1),
        GiProfile("1g.35gb",       9, 15, 1, 4,  33280,  26, 1, 1, 0, 1, 0),
        GiProfile("2g.35gb",       1, 14, 2, 3,  33280,  32, 2, 2, 0, 2, 0),
        GiProfile("3g.71gb",       2,  9, 3, 2,  71424,  60, 3, 3, 0, 3, 0),
        GiProfile("4g.71gb",       3,  5, 4, 1,  71424,  64, 4, 4, 0, 4, 0),
        GiProfile("7g.141gb",      4,  0, 7, 1, 143360, 132, 8, 7, 0, 7, 1),
    ),
)

MODELS: dict[str, GpuModel] = {m.name: m for m in (A100_SXM4_40GB, H100_80GB_HBM3, H200)}
