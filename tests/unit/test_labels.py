"""GPU feature discovery's labels (core.labels), on every built-in simulated node and on hand-made
ones: the format rules per MIG strategy (tests/label_rules.py), sharing, and the quirks of the
official GFD v0.20 that nvdp keeps."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import pytest

from nvdp.backends.simulated.expand import build_node
from nvdp.backends.simulated.profile import builtin_profiles, load_profile
from nvdp.config.load import load
from nvdp.config.options import GFD_OPTIONS, Config, SharedResource, Sharing
from nvdp.core import labels as lb
from nvdp.core.devices import FabricInfo, GpuInfo, MigInfo, Node, VgpuInfo
from nvdp.core.labels import SharingView, node_labels
from nvdp.errors import LabelError
from tests.label_rules import (
    MIXED,
    NONE,
    SINGLE,
    SINGLE_INVALID,
    SINGLE_NO_MIG,
    RuleSet,
    check,
    profiles_in,
)

P = "nvidia.com/"
Kind = Literal["no-mig", "single-ok", "single-invalid"]
# What each built-in profile is, for `single`: a new profile must be added here (a test checks).
PROFILE_KINDS: dict[str, Kind] = {
    "a100-mig-mixed": "single-invalid",
    "dgx-h100": "no-mig",
    "dgx1-v100": "no-mig",
    "dgx2-v100": "no-mig",
    "h100-mig-single": "single-ok",
    "h200": "no-mig",
    "h200-mig": "single-invalid",
    "pcie-l40s": "no-mig",
}
SHARINGS = {
    "no-sharing": SharingView(),
    "time-slicing": SharingView("time-slicing", (SharedResource(f"{P}gpu", 4),
                                                 SharedResource(f"{P}mig-1g.5gb", 3))),
    "time-slicing-renamed": SharingView("time-slicing", (SharedResource(f"{P}gpu", 2, f"{P}gpu.shared",
                                                                        rename_by_default=True),)),
    "mps": SharingView("mps", (SharedResource(f"{P}gpu", 5),)),
}


def node_of(profile: str) -> Node:
    return build_node(*load_profile(profile))


def rules_for(profile: str, strategy: str) -> RuleSet:
    if strategy == "none":
        return NONE
    if strategy == "mixed":
        return MIXED
    return {"no-mig": SINGLE_NO_MIG, "single-ok": SINGLE, "single-invalid": SINGLE_INVALID}[PROFILE_KINDS[profile]]


def test_every_builtin_profile_has_a_kind() -> None:
    assert sorted(PROFILE_KINDS) == builtin_profiles()


@pytest.mark.parametrize("sharing", list(SHARINGS))
@pytest.mark.parametrize("strategy", ["none", "single", "mixed"])
@pytest.mark.parametrize("profile", builtin_profiles())
def test_every_profile_strategy_and_sharing_follows_the_format_rules(profile: str, strategy: str,
                                                                     sharing: str) -> None:
    node = node_of(profile)
    view = SHARINGS[sharing]
    if view.strategy == "mps" and any(g.mig_enabled for g in node.gpus):
        with pytest.raises(LabelError, match="MIG-enabled"):
            node_labels(node, Config(mig_strategy=strategy), "DGX H100", 1700000000, view)  # type: ignore[arg-type]
        return
    result = node_labels(node, Config(mig_strategy=strategy), "DGX H100", 1700000000, view)  # type: ignore[arg-type]
    assert check(result.labels, rules_for(profile, strategy)) == []
    assert result.labels[f"{P}gfd.timestamp"] == "1700000000"
    if strategy == "mixed":
        expected = {"mig-" + str(p).replace("+", ".") for g in node.gpus for p in _profile_names(g)}
        assert set(profiles_in(result.labels)) == expected


def _profile_names(gpu: GpuInfo) -> set[str]:
    from nvdp.core.mig import profile_of

    return {str(profile_of(gpu, m)) for m in gpu.mig_devices}


@pytest.mark.parametrize("profile", builtin_profiles())
def test_sharing_labels_of_full_gpus(profile: str) -> None:
    node = node_of(profile)
    shared = node_labels(node, Config(), None, None, SHARINGS["time-slicing"]).labels
    renamed = node_labels(node, Config(), None, None, SHARINGS["time-slicing-renamed"]).labels
    plain = node_labels(node, Config(), None, None).labels
    if any(not g.mig_enabled for g in node.gpus):  # MIG-disabled GPUs carry the sharing
        assert (shared[f"{P}gpu.replicas"], shared[f"{P}gpu.sharing-strategy"]) == ("4", "time-slicing")
        assert shared[f"{P}gpu.product"] == plain[f"{P}gpu.product"] + "-SHARED"
        assert (renamed[f"{P}gpu.replicas"], renamed[f"{P}gpu.product"]) == ("2", plain[f"{P}gpu.product"])
    else:  # every GPU MIG-enabled: full-GPU labels without sharing, as upstream
        assert (shared[f"{P}gpu.replicas"], shared[f"{P}gpu.sharing-strategy"]) == ("0", "none")
    assert plain[f"{P}gpu.sharing-strategy"] == "none"
    assert plain[f"{P}mps.capable"] == "false"


# ---------------------------------------------------------------------------------------------
# Observed in the official GFD v0.20.0 and kept


def test_count_counts_every_gpu_and_mig_enabled_gpus_get_no_replicas_under_none() -> None:
    node = node_of("a100-mig-mixed")  # 7 MIG-enabled GPUs, 1 MIG-disabled
    labels = node_labels(node, Config(mig_strategy="none"), None, None, SHARINGS["time-slicing"]).labels
    assert labels[f"{P}gpu.count"] == "8"
    assert labels[f"{P}gpu.replicas"] == "4"  # the MIG-disabled GPU's labels win
    only_mig = replace(node, gpus=tuple(g for g in node.gpus if g.mig_enabled))
    labels = node_labels(only_mig, Config(mig_strategy="none"), None, None, SHARINGS["time-slicing"]).labels
    assert (labels[f"{P}gpu.count"], labels[f"{P}gpu.replicas"]) == ("7", "0")
    assert labels[f"{P}gpu.product"] == "NVIDIA-A100-SXM4-40GB"  # no -SHARED: sharing does not apply


@pytest.mark.parametrize("profile", ["a100-mig-mixed", "h200-mig"])
def test_single_on_a_mixed_layout_is_mig_invalid(profile: str) -> None:
    result = node_labels(node_of(profile), Config(mig_strategy="single"), None, None, SHARINGS["time-slicing"])
    labels = result.labels
    model = lb.sanitise(node_of(profile).gpus[0].name)
    assert labels[f"{P}gpu.product"] == f"{model}-MIG-INVALID"
    assert [labels[f"{P}gpu.{k}"] for k in ("count", "replicas", "memory", "sharing-strategy")] == ["0", "0", "0", ""]
    assert any("Invalid configuration detected for mig-strategy=single" in w for w in result.warnings)


def test_single_on_a_uniform_layout() -> None:
    labels = node_labels(node_of("h100-mig-single"), Config(mig_strategy="single"), None, None).labels
    assert labels[f"{P}gpu.product"] == "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb"
    assert labels[f"{P}gpu.count"] == "56"
    assert labels[f"{P}gpu.memory"] == "9984"  # the MIG device's memory in MB (NVML's attribute)
    assert labels[f"{P}gpu.replicas"] == "1"
    assert [labels[f"{P}gpu.{k}"] for k in ("slices.gi", "slices.ci", "multiprocessors", "engines.copy",
                                            "engines.decoder", "engines.encoder", "engines.jpeg",
                                            "engines.ofa")] == ["1", "1", "16", "1", "1", "0", "1", "0"]
    shared = node_labels(node_of("h100-mig-single"), Config(mig_strategy="single"), None, None,
                         SHARINGS["time-slicing"]).labels
    assert shared[f"{P}gpu.product"] == "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb-SHARED"
    assert (shared[f"{P}gpu.replicas"], shared[f"{P}gpu.sharing-strategy"]) == ("4", "time-slicing")


def test_mixed_profiles_with_sharing_and_media_extensions() -> None:
    labels = node_labels(node_of("a100-mig-mixed"), Config(mig_strategy="mixed"), None, None,
                         SHARINGS["time-slicing"]).labels
    assert labels[f"{P}mig-1g.5gb.count"] == "24"
    assert labels[f"{P}mig-1g.5gb.replicas"] == "3"
    assert labels[f"{P}mig-1g.5gb.sharing-strategy"] == "time-slicing"
    assert labels[f"{P}mig-1g.5gb.product"] == "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb-SHARED"
    assert labels[f"{P}mig-3g.20gb.replicas"] == "1"
    assert labels[f"{P}mig-3g.20gb.product"] == "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb"
    assert f"{P}mig-7g.40gb.count" not in labels  # the empty MIG-enabled GPU adds nothing
    me = node_labels(node_of("h200-mig"), Config(mig_strategy="mixed"), None, None).labels
    assert me[f"{P}mig-1g.18gb.me.count"] == "1"
    assert me[f"{P}mig-1g.18gb.me.product"] == "NVIDIA-H200-MIG-1g.18gbme"  # sanitising drops the `+`


def test_rename_is_ignored_for_the_product_only_rename_by_default_drops_shared() -> None:
    files = {
        "rename": "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
                  "      - {name: nvidia.com/gpu, replicas: 3, rename: gpu.split}\n",
        "by-default": "version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: true\n    resources:\n"
                      "      - {name: nvidia.com/gpu, replicas: 3}\n",
    }
    node = node_of("h200")
    products = {}
    for name in files:
        cfg = load({"config_file": name}, {}, read_text=files.__getitem__, options=GFD_OPTIONS)
        labels = node_labels(node, cfg, None, None).labels
        assert (labels[f"{P}gpu.replicas"], labels[f"{P}gpu.sharing-strategy"]) == ("3", "time-slicing")
        products[name] = labels[f"{P}gpu.product"]
    assert products == {"rename": "NVIDIA-H200-SHARED", "by-default": "NVIDIA-H200"}


def test_replicas_below_two_are_refused() -> None:
    from nvdp.errors import ConfigError

    text = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n      - {name: nvidia.com/gpu, replicas: 1}\n"
    with pytest.raises(ConfigError, match="replicas must be >= 2"):
        load({"config_file": "c"}, {}, read_text=lambda _: text, options=GFD_OPTIONS)
    with pytest.raises(LabelError, match="replicas must be >= 2"):
        node_labels(node_of("h200"), Config(), None, None, SharingView("mps", (SharedResource(f"{P}gpu", 1),)))


def test_mps() -> None:
    labels = node_labels(node_of("dgx-h100"), Config(), None, None, SHARINGS["mps"]).labels
    assert labels[f"{P}mps.capable"] == "true"
    assert (labels[f"{P}gpu.replicas"], labels[f"{P}gpu.sharing-strategy"]) == ("5", "mps")
    assert labels[f"{P}gpu.product"] == "NVIDIA-H100-80GB-HBM3-SHARED"
    with pytest.raises(LabelError, match=r"MPS sharing is not supported on MIG-enabled devices \(GPU 0\)"):
        node_labels(node_of("h200-mig"), Config(), None, None, SHARINGS["mps"])


def test_sharing_view_of_a_loaded_config() -> None:
    assert lb.sharing_view(Sharing()).strategy == "none"
    view = lb.sharing_view(Sharing(resources=(SharedResource(f"{P}gpu", 2),)))
    assert view.strategy == "time-slicing" and view.resource(f"{P}gpu") is not None
    assert lb.sharing_view(Sharing(resources=(SharedResource(f"{P}gpu", 2),), mps=True)).strategy == "mps"


# MPS through a real config file (config/file.py parses `sharing.mps`; GFD loads it with its own
# table, so neither --mps-root nor the plugin's mixed-strategy rule applies, as upstream).

def mps_file(entry: str = "{name: nvidia.com/gpu, replicas: 4}", block: str = "") -> str:
    return f"version: v1\nsharing:\n  mps:\n{block}    resources:\n      - {entry}\n"


def gfd_labels(profile: str, text: str, strategy: str = "none") -> dict[str, str]:
    cfg = load({"config_file": "c", "mig_strategy": strategy}, {}, read_text=lambda _: text, options=GFD_OPTIONS)
    return node_labels(node_of(profile), cfg, None, None).labels


def test_mps_from_a_config_file() -> None:
    labels = gfd_labels("dgx-h100", mps_file())
    assert labels[f"{P}mps.capable"] == "true"
    assert (labels[f"{P}gpu.replicas"], labels[f"{P}gpu.sharing-strategy"]) == ("4", "mps")
    assert labels[f"{P}gpu.product"] == "NVIDIA-H100-80GB-HBM3-SHARED"
    assert labels[f"{P}gpu.count"] == "8"
    assert check(labels, NONE) == []


def test_mps_from_a_config_file_suffix_rule() -> None:
    by_default = gfd_labels("dgx-h100", mps_file(block="    renameByDefault: true\n"))
    assert by_default[f"{P}gpu.product"] == "NVIDIA-H100-80GB-HBM3"  # served as nvidia.com/gpu.shared
    # An explicit rename keeps -SHARED (upstream GFD drops the rename; nvdp's plugin serves it).
    renamed = gfd_labels("dgx-h100", mps_file("{name: nvidia.com/gpu, replicas: 4, rename: gpu.mps}"))
    assert renamed[f"{P}gpu.product"] == "NVIDIA-H100-80GB-HBM3-SHARED"
    # With a selection of devices the labels are still the resource's, as upstream labels it.
    some = gfd_labels("dgx-h100", mps_file("{name: nvidia.com/gpu, replicas: 2, devices: [6, 7], rename: gpu.mps}"))
    assert (some[f"{P}gpu.replicas"], some[f"{P}gpu.count"], some[f"{P}mps.capable"]) == ("2", "8", "true")


def test_mps_wins_over_time_slicing_in_a_config_file() -> None:
    text = ("version: v1\nsharing:\n  timeSlicing:\n    resources:\n      - {name: nvidia.com/gpu, replicas: 8}\n"
            "  mps:\n    resources:\n      - {name: nvidia.com/gpu, replicas: 3}\n")
    labels = gfd_labels("h200", text)
    assert (labels[f"{P}gpu.replicas"], labels[f"{P}gpu.sharing-strategy"], labels[f"{P}mps.capable"]) == (
        "3", "mps", "true")


def test_mps_needs_no_mps_root_and_no_plugin_strategy_rule_for_gfd() -> None:
    # The plugin refuses both at load; upstream GFD checks neither, and labels a node without MIG.
    labels = gfd_labels("dgx-h100", mps_file(), strategy="mixed")
    assert (labels[f"{P}mig.strategy"], labels[f"{P}mps.capable"]) == ("mixed", "true")
    from nvdp.errors import ConfigError

    with pytest.raises(ConfigError, match="--mps-root"):
        load({"config_file": "c"}, {}, read_text=lambda _: mps_file())


@pytest.mark.parametrize("profile", [p for p in builtin_profiles() if any(g.mig_enabled for g in node_of(p).gpus)])
@pytest.mark.parametrize("strategy", ["none", "single", "mixed"])
def test_mps_from_a_config_file_on_a_mig_enabled_node_is_an_error(profile: str, strategy: str) -> None:
    with pytest.raises(LabelError, match="MPS sharing is not supported on MIG-enabled devices"):
        gfd_labels(profile, mps_file(), strategy)


def test_mps_replicas_below_two_in_a_config_file_are_refused_naming_the_field() -> None:
    from nvdp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sharing\.mps\.resources\.0\.replicas.*must be >= 2"):
        gfd_labels("dgx-h100", mps_file("{name: nvidia.com/gpu, replicas: 1}"))


# ---------------------------------------------------------------------------------------------
# Single labels


def gpu(index: int = 0, **kw: object) -> GpuInfo:
    fields: dict[str, object] = {
        "index": index, "uuid": f"GPU-{index}", "minor": index, "name": "NVIDIA A100-SXM4-40GB",
        "pci_bus_id": f"00000000:{index + 1:02X}:00.0", "memory_bytes": 40960 * 2**20,
        "compute_capability": "8.0", "pci_class": 0x030200,
    }
    fields.update(kw)
    return GpuInfo(**fields)  # type: ignore[arg-type]


def labels_of(*gpus: GpuInfo, **node_kw: object) -> dict[str, str]:
    node = Node(gpus=gpus, driver_version=str(node_kw.get("driver", "580.159.04")),
                cuda_driver_version=int(node_kw.get("cuda", 13000)))  # type: ignore[call-overload]
    return node_labels(node, Config(), node_kw.get("machine"), None).labels  # type: ignore[arg-type]


@pytest.mark.parametrize(("driver", "parts"), [
    ("580.159.04", ("580", "159", "04")),
    ("550.54", ("550", "54", "")),
])
def test_driver_version(driver: str, parts: tuple[str, str, str]) -> None:
    labels = labels_of(gpu(), driver=driver)
    assert (labels[f"{P}cuda.driver.major"], labels[f"{P}cuda.driver.minor"], labels[f"{P}cuda.driver.rev"]) == parts
    assert (labels[f"{P}cuda.driver-version.major"], labels[f"{P}cuda.driver-version.minor"],
            labels[f"{P}cuda.driver-version.revision"]) == parts
    assert labels[f"{P}cuda.driver-version.full"] == driver


@pytest.mark.parametrize("driver", ["580", "1.2.3.4", ""])
def test_driver_version_in_another_format_is_an_error(driver: str) -> None:
    with pytest.raises(LabelError, match=r'does not match format "X.Y\[.Z\]"'):
        labels_of(gpu(), driver=driver)


@pytest.mark.parametrize(("cuda", "major", "minor"), [(13000, "13", "0"), (12040, "12", "4"), (12020, "12", "2"),
                                                      (11080, "11", "8")])
def test_cuda_version(cuda: int, major: str, minor: str) -> None:
    labels = labels_of(gpu(), cuda=cuda)
    assert (labels[f"{P}cuda.runtime.major"], labels[f"{P}cuda.runtime.minor"]) == (major, minor)
    assert (labels[f"{P}cuda.runtime-version.major"], labels[f"{P}cuda.runtime-version.minor"]) == (major, minor)
    assert labels[f"{P}cuda.runtime-version.full"] == f"{major}.{minor}"


def test_unknown_cuda_version_is_an_error() -> None:
    with pytest.raises(LabelError, match="no CUDA driver version"):
        labels_of(gpu(), cuda=0)


@pytest.mark.parametrize(("cc", "family"), [
    ("1.3", "tesla"), ("2.1", "fermi"), ("3.7", "kepler"), ("5.2", "maxwell"), ("6.0", "pascal"),
    ("7.0", "volta"), ("7.2", "volta"), ("7.5", "turing"), ("8.0", "ampere"), ("8.6", "ampere"),
    ("8.9", "ada-lovelace"), ("9.0", "hopper"), ("10.0", "blackwell"), ("12.0", "blackwell"),
    ("13.0", "rubin"), ("4.0", "undefined"), ("11.0", "undefined"),
])
def test_family(cc: str, family: str) -> None:
    labels = labels_of(gpu(compute_capability=cc))
    assert labels[f"{P}gpu.family"] == family
    assert (labels[f"{P}gpu.compute.major"], labels[f"{P}gpu.compute.minor"]) == tuple(cc.split("."))


def test_no_architecture_or_memory_labels_when_unknown() -> None:
    labels = labels_of(gpu(compute_capability="0.0", memory_bytes=0))
    assert not {f"{P}gpu.family", f"{P}gpu.compute.major", f"{P}gpu.compute.minor", f"{P}gpu.memory"} & set(labels)
    with pytest.raises(LabelError, match="compute capability"):
        labels_of(gpu(compute_capability="nine"))


def test_memory_is_mib() -> None:
    assert labels_of(gpu(memory_bytes=150754820096))[f"{P}gpu.memory"] == "143771"


@pytest.mark.parametrize(("classes", "mode"), [
    ((0x030200, 0x030200), "compute"),
    ((0x030000,), "graphics"),
    ((0x030200, 0x030000), "unknown"),  # classes differ
    ((0x030200, None), "unknown"),  # a class file missing
    ((0x038000,), "unknown"),  # another display class
    ((None,), "unknown"),
])
def test_gpu_mode(classes: tuple[int | None, ...], mode: str) -> None:
    assert labels_of(*(gpu(i, pci_class=c) for i, c in enumerate(classes)))[f"{P}gpu.mode"] == mode


def test_mig_capable() -> None:
    assert labels_of(gpu(mig_capable=False))[f"{P}mig.capable"] == "false"
    assert labels_of(gpu(0, mig_capable=False), gpu(1, mig_capable=True))[f"{P}mig.capable"] == "true"
    # a MIG-enabled GPU is MIG-capable even when discovery did not say so
    assert labels_of(gpu(mig_enabled=True))[f"{P}mig.capable"] == "true"


UUID_A = "b2c1a3e5-0000-4000-8000-000000000001"
UUID_B = "b2c1a3e5-0000-4000-8000-000000000002"


def test_clique_when_every_fabric_attached_gpu_agrees() -> None:
    same = FabricInfo(UUID_A, 7)
    labels = labels_of(gpu(0, fabric=same), gpu(1, fabric=same), gpu(2))  # GPU 2 not attached: ignored
    assert labels[f"{P}gpu.clique"] == f"{UUID_A}.7"
    assert f"{P}gpu.clique" not in labels_of(gpu())


@pytest.mark.parametrize("other", [FabricInfo(UUID_B, 7), FabricInfo(UUID_A, 8)])
def test_no_clique_when_gpus_disagree(other: FabricInfo) -> None:
    node = Node(gpus=(gpu(0, fabric=FabricInfo(UUID_A, 7)), gpu(1, fabric=other)), driver_version="580.1",
                cuda_driver_version=13000)
    result = node_labels(node, Config(), None, None)
    assert f"{P}gpu.clique" not in result.labels
    assert any("differ between GPUs" in w for w in result.warnings)


def test_vgpu() -> None:
    assert labels_of(gpu())[f"{P}vgpu.present"] == "false"
    assert f"{P}vgpu.host-driver-version" not in labels_of(gpu())
    labels = labels_of(gpu(0, vgpu=VgpuInfo("535.1", "r535_00")), gpu(1, vgpu=VgpuInfo("550.2", "r550_00")))
    assert labels[f"{P}vgpu.present"] == "true"
    assert (labels[f"{P}vgpu.host-driver-version"], labels[f"{P}vgpu.host-driver-branch"]) == ("550.2", "r550_00")


@pytest.mark.parametrize(("text", "label"), [
    ("DGX H100\n", "DGX-H100"),
    ("  PowerEdge  R760xa \n", "PowerEdge-R760xa"),
    ("ProLiant DL380 Gen10 (Plus)/x\n", "ProLiant-DL380-Gen10-Plusx"),
    ("", ""),
])
def test_machine_type_is_sanitised(text: str, label: str) -> None:
    assert labels_of(gpu(), machine=text)[f"{P}gpu.machine"] == label


def test_machine_type_unreadable_is_unknown() -> None:
    assert labels_of(gpu(), machine=None)[f"{P}gpu.machine"] == "unknown"


@pytest.mark.parametrize(("name", "product"), [
    ("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3"),
    ("Tesla V100-SXM2-32GB", "Tesla-V100-SXM2-32GB"),
    ("NVIDIA  RTX A6000 (x)", "NVIDIA-RTX-A6000-x"),
    ("GRID A100-8C", "GRID-A100-8C"),
])
def test_product_is_sanitised(name: str, product: str) -> None:
    assert labels_of(gpu(name=name))[f"{P}gpu.product"] == product


def test_a_node_without_gpus_gets_only_the_timestamp() -> None:
    assert node_labels(Node(gpus=()), Config(), "DGX", 1700000001).labels == {f"{P}gfd.timestamp": "1700000001"}
    assert node_labels(Node(gpus=()), Config(), "DGX", None).labels == {}


def test_several_models_the_rule_is_deterministic() -> None:
    l40s = {"name": "NVIDIA L40S", "memory_bytes": 46068 * 2**20, "compute_capability": "8.9"}
    a100, other = gpu(0), gpu(1, **l40s)
    node = Node(gpus=(a100, other, gpu(2, **l40s)), driver_version="580.1", cuda_driver_version=13000)
    result = node_labels(node, Config(), None, None)
    # the lowest-indexed GPU's model, counted per model
    assert (result.labels[f"{P}gpu.product"], result.labels[f"{P}gpu.count"]) == ("NVIDIA-A100-SXM4-40GB", "1")
    assert result.labels[f"{P}gpu.family"] == "ampere"
    assert any("Multiple device types detected" in w for w in result.warnings)
    # a MIG-disabled model wins over a MIG-enabled one, whatever the order
    mig_first = Node(gpus=(replace(a100, mig_enabled=True), other), driver_version="580.1", cuda_driver_version=13000)
    labels = node_labels(mig_first, Config(), None, None).labels
    assert (labels[f"{P}gpu.product"], labels[f"{P}gpu.family"], labels[f"{P}gpu.replicas"]) == (
        "NVIDIA-L40S", "ada-lovelace", "1")


def test_mig_device_attributes_come_from_the_first_device_of_the_profile() -> None:
    device = MigInfo(slot=0, uuid="MIG-a", gi_id=1, ci_id=0, gi_slices=1, ci_slices=1, memory_mb=4864,
                     multiprocessors=14, copy_engines=1, decoders=2, encoders=3, jpegs=4, ofas=5)
    node = Node(gpus=(gpu(0, mig_enabled=True, mig_devices=(device,)),), driver_version="580.1",
                cuda_driver_version=13000)
    labels = node_labels(node, Config(mig_strategy="single"), None, None).labels
    assert [labels[f"{P}gpu.engines.{e}"] for e in ("copy", "decoder", "encoder", "jpeg", "ofa")] == [
        "1", "2", "3", "4", "5"]


def test_label_lines_are_sorted_key_value_lines() -> None:
    assert lb.label_lines({"b": "2", "a": "1", "c": ""}) == "a=1\nb=2\nc=\n"


def test_the_format_rules_can_fail() -> None:
    good = node_labels(node_of("a100-mig-mixed"), Config(mig_strategy="mixed"), None, 1700000000).labels
    assert check(good, MIXED) == []
    missing = {k: v for k, v in good.items() if k != f"{P}gpu.family"}
    assert check(missing, MIXED) == [f"missing {P}gpu.family"]
    assert check({**good, f"{P}gpu.mode": "c"}, MIXED) == [f"{P}gpu.mode=c does not match (unknown|compute|graphics)"]
    assert check({**good, f"{P}gpu.extra": "1"}, MIXED) == [f"{P}gpu.extra=1: no rule for this label"]
    partial = {k: v for k, v in good.items() if k != f"{P}mig-2g.10gb.slices.ci"}
    assert len(check(partial, MIXED)) == 1 and "for mig-2g.10gb" in check(partial, MIXED)[0]
    assert check(good, NONE)  # mixed keys are not in the none set
    assert check({**good, f"{P}gfd.timestamp": "17"}, MIXED)  # ten digits
