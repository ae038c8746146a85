"""The pure CDI spec builder (core/cdi.py): the specs of the dgx-h100, a100-mig-mixed and h200
profiles field by field, names as Allocate hands them out, hooks, feature flags, feature classes
and the cdiVersion rule. Driver facts are written out here (the scanner has its own tests)."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import pytest

from nvdp.backends.simulated.expand import build_node
from nvdp.backends.simulated.profile import load_profile
from nvdp.config.load import load
from nvdp.core.cdi import (
    DriverFacts,
    DrmNodes,
    Library,
    SpecSettings,
    build_specs,
    handed_out,
    required_version,
    to_json,
)
from nvdp.core.container import edits_for
from nvdp.core.devices import Node
from nvdp.core.resources import plan_tree
from nvdp.errors import ConfigError

VERSION = "580.159.04"
LIB = "/usr/lib/x86_64-linux-gnu"
FACTS = DriverFacts(
    version=VERSION,
    libraries=(
        Library(f"{LIB}/libcuda.so.{VERSION}", ("libcuda.so.1",)),
        Library(f"{LIB}/libnvidia-ml.so.{VERSION}", ("libnvidia-ml.so.1",)),
        Library(f"{LIB}/libnvidia-allocator.so.{VERSION}", ("libnvidia-allocator.so.1",)),
        Library(f"{LIB}/vdpau/libvdpau_nvidia.so.{VERSION}", ("libvdpau_nvidia.so.1",)),
    ),
    binaries=("/usr/bin/nvidia-smi",),
    firmware=(f"/lib/firmware/nvidia/{VERSION}/gsp_ga10x.bin",),
    ipc_sockets=("/run/nvidia-persistenced/socket",),
    config_files=("/etc/vulkan/icd.d/nvidia_icd.json",),
    control_nodes=("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"),
)
RO = ["ro", "nosuid", "nodev", "rbind", "rprivate"]
H200_UUID = "GPU-561c5ac8-2525-530f-236a-f8e1e82e0c3b"
DGX_H100_UUIDS = [
    "GPU-50679f0e-63af-04db-1989-74b23d854dbf", "GPU-9b266fff-626c-364f-39b6-4685154e8afb",
    "GPU-821ab636-9dc4-0696-e2eb-c98790d91e14", "GPU-dc11538d-fbed-91ef-42be-1508c18a34b7",
    "GPU-1a8e9568-3ea5-41d5-c5e7-805da923b6c9", "GPU-bcbe4e81-e99a-f2ce-bfe5-f1955b68a17b",
    "GPU-27613b14-2eef-f4c6-ddc4-87eebf06ef86", "GPU-20f73337-b91f-b084-c12c-872066f58c4c",
]


@functools.cache
def node(profile: str) -> Node:
    return build_node(*load_profile(profile))


def settings(**cli: Any) -> SpecSettings:
    cfg = load({"device_list_strategy": "cdi-cri", **cli}, {})
    return SpecSettings.from_config(cfg)


def hook(*args: str) -> dict[str, Any]:
    return {"hookName": "createContainer", "path": "/usr/bin/nvidia-ctk", "args": ["nvidia-ctk", "hook", *args],
            "env": ["NVIDIA_CTK_DEBUG=false"]}


def mount(path: str, host_root: str = "", options: list[str] = RO) -> dict[str, Any]:
    return {"hostPath": host_root + path, "containerPath": path, "options": options}


def node_entry(path: str, dev_root: str = "") -> dict[str, str]:
    return {"path": path, "hostPath": dev_root + path}


def common(host_root: str = "", dev_root: str = "") -> dict[str, Any]:
    return {
        "env": [f"NVIDIA_CTK_LIBCUDA_DIR={LIB}", "NVIDIA_VISIBLE_DEVICES=void"],
        "deviceNodes": [node_entry(p, dev_root)
                        for p in ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")],
        "mounts": [
            mount("/usr/bin/nvidia-smi", host_root),
            mount(f"{LIB}/libcuda.so.{VERSION}", host_root),
            mount(f"{LIB}/libnvidia-allocator.so.{VERSION}", host_root),
            mount(f"{LIB}/libnvidia-ml.so.{VERSION}", host_root),
            mount(f"{LIB}/vdpau/libvdpau_nvidia.so.{VERSION}", host_root),
            mount("/etc/vulkan/icd.d/nvidia_icd.json", host_root),
            mount(f"/lib/firmware/nvidia/{VERSION}/gsp_ga10x.bin", host_root),
            mount("/run/nvidia-persistenced/socket", host_root, ["nosuid", "nodev", "noexec", "rbind", "rprivate"]),
        ],
        "hooks": [
            hook("create-symlinks", "--link", f"../libnvidia-allocator.so.1::{LIB}/gbm/nvidia-drm_gbm.so"),
            hook("create-symlinks",
                 "--link", f"libcuda.so.1::{LIB}/libcuda.so",
                 "--link", f"libcuda.so.{VERSION}::{LIB}/libcuda.so.1",
                 "--link", f"libnvidia-allocator.so.{VERSION}::{LIB}/libnvidia-allocator.so.1",
                 "--link", f"libnvidia-ml.so.{VERSION}::{LIB}/libnvidia-ml.so.1",
                 "--link", f"libvdpau_nvidia.so.{VERSION}::{LIB}/vdpau/libvdpau_nvidia.so.1"),
            hook("enable-cuda-compat", f"--host-driver-version={VERSION}"),
            hook("update-ldcache", "--folder", LIB, "--folder", f"{LIB}/vdpau"),
            hook("disable-device-node-modification"),
            hook("update-application-profile"),
        ],
    }


def test_h200_spec_whole() -> None:
    specs = build_specs(node("h200"), FACTS, settings())
    assert specs.notes == ()
    assert [s.cls for s in specs.specs] == ["gpu"]
    assert specs.specs[0].doc == {
        "cdiVersion": "0.5.0",
        "kind": "k8s.device-plugin.nvidia.com/gpu",
        "devices": [{"name": H200_UUID, "containerEdits": {"deviceNodes": [node_entry("/dev/nvidia0")]}}],
        "containerEdits": common(),
    }
    assert specs.specs[0].file_name() == "k8s.device-plugin.nvidia.com-gpu.json"
    text = to_json(specs.specs[0].doc)
    assert text.endswith("}\n") and text.index('"cdiVersion"') < text.index('"kind"') < text.index('"devices"')


def test_h200_host_paths_follow_the_driver_root_and_dev_root() -> None:
    """The official plugin's /driver-root -> --driver-root rewrite; the dev root apart."""
    spec = build_specs(node("h200"), FACTS, settings(driver_root="/run/nvidia/driver", dev_root="/host")).specs[0]
    assert spec.doc["containerEdits"] == common("/run/nvidia/driver", "/host")
    assert spec.doc["devices"][0]["containerEdits"]["deviceNodes"] == [node_entry("/dev/nvidia0", "/host")]
    # The dev root defaults to the driver root, as upstream.
    spec = build_specs(node("h200"), FACTS, settings(driver_root="/run/nvidia/driver")).specs[0]
    assert spec.doc["devices"][0]["containerEdits"]["deviceNodes"] == [node_entry("/dev/nvidia0", "/run/nvidia/driver")]


def test_dgx_h100_one_device_per_gpu_sorted_by_name_no_all() -> None:
    spec = build_specs(node("dgx-h100"), FACTS, settings()).specs[0]
    minors = {uuid: i for i, uuid in enumerate(DGX_H100_UUIDS)}
    assert spec.device_names == tuple(sorted(DGX_H100_UUIDS))
    assert "all" not in spec.device_names
    for device in spec.doc["devices"]:
        assert device == {"name": device["name"], "containerEdits": {
            "deviceNodes": [node_entry(f"/dev/nvidia{minors[device['name']]}")]}}
    assert spec.doc["containerEdits"] == common()
    assert spec.doc["cdiVersion"] == "0.5.0"


def test_dgx_h100_index_names() -> None:
    spec = build_specs(node("dgx-h100"), FACTS, settings(device_id_strategy="index")).specs[0]
    assert spec.device_names == ("0", "1", "2", "3", "4", "5", "6", "7")
    assert [d["containerEdits"]["deviceNodes"][0]["path"] for d in spec.doc["devices"]] == [
        f"/dev/nvidia{i}" for i in range(8)]


def _caps(gpu_minor: int, gi: int, ci: int) -> list[str]:
    """The simulated driver's mig-minors numbering (config 1, monitor 2, then 15 GIs x (1 + 8 CIs) per GPU)."""
    base = 3 + gpu_minor * 135 + gi * 9
    return [f"/dev/nvidia-caps/nvidia-cap{base}", f"/dev/nvidia-caps/nvidia-cap{base + 1 + ci}"]


def test_a100_mig_mixed_every_gpu_and_mig_device() -> None:
    n = node("a100-mig-mixed")
    spec = build_specs(n, FACTS, settings(mig_strategy="mixed")).specs[0]
    assert len(spec.device_names) == 8 + 3 * 7 + 3 * 3  # every GPU (any strategy may serve it whole) + 30 MIG devices
    assert list(spec.device_names) == sorted(spec.device_names)
    by_name = {d["name"]: d["containerEdits"]["deviceNodes"] for d in spec.doc["devices"]}
    for gpu in n.gpus:
        assert by_name[gpu.uuid] == [node_entry(f"/dev/nvidia{gpu.minor}")]
        for mig in gpu.mig_devices:
            assert by_name[mig.uuid] == [node_entry(p) for p in (f"/dev/nvidia{gpu.minor}",
                                                                  *_caps(gpu.minor, mig.gi_id, mig.ci_id))]
    # Spot checks with the numbers written out: GPU 3's 2g.10gb (slot 1, GI 2, CI 0), GPU 0's first 1g.5gb.
    assert by_name["MIG-d9e15001-0aea-4bee-ec3d-21ed17adfdf5"] == [
        node_entry("/dev/nvidia3"), node_entry("/dev/nvidia-caps/nvidia-cap426"),
        node_entry("/dev/nvidia-caps/nvidia-cap427")]
    assert by_name["MIG-bb17ed66-c006-5292-81b6-6e7e6bd77b50"] == [
        node_entry("/dev/nvidia0"), node_entry("/dev/nvidia-caps/nvidia-cap12"),
        node_entry("/dev/nvidia-caps/nvidia-cap13")]
    assert spec.doc["containerEdits"] == common()


def test_a100_mig_mixed_index_names() -> None:
    spec = build_specs(node("a100-mig-mixed"), FACTS, settings(device_id_strategy="index")).specs[0]
    names = set(spec.device_names)
    assert {"0", "0:0", "0:6", "3:0", "3:1", "3:2", "6", "7"} <= names
    assert "6:0" not in names and "7:0" not in names  # GPU 6 has MIG off, GPU 7 no MIG devices


# a100-mig-mixed with single is refused at start (mixed MIG modes): no Allocate to check.
SERVABLE = [(p, m) for p in ("dgx-h100", "a100-mig-mixed", "h200") for m in ("none", "single", "mixed")
            if (p, m) != ("a100-mig-mixed", "single")]


@pytest.mark.parametrize(("profile", "mig_strategy"), SERVABLE)
@pytest.mark.parametrize("id_strategy", ["uuid", "index"])
@pytest.mark.parametrize("replicas", [None, 3])
def test_every_name_allocate_hands_out_is_in_the_spec(profile: str, mig_strategy: str, id_strategy: str,
                                                      replicas: int | None, tmp_path: Any) -> None:
    n = node(profile)
    cli: dict[str, Any] = {"mig_strategy": mig_strategy, "device_id_strategy": id_strategy}
    if replicas:
        config = tmp_path / "c.yaml"
        config.write_text(f"version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
                          f"      - name: nvidia.com/gpu\n        replicas: {replicas}\n")
        cli["config_file"] = str(config)
    cfg = load({"device_list_strategy": "cdi-cri", **cli}, {})
    tree = plan_tree(n, cfg).tree
    spec = build_specs(n, FACTS, SpecSettings.from_config(cfg)).specs[0]
    assert handed_out(tree, id_strategy) <= set(spec.device_names)
    prefix = "k8s.device-plugin.nvidia.com/gpu="
    for resource in tree.values():
        for device in resource.devices[:3]:
            edits = edits_for(resource, [device.id], cfg, ())
            assert all(name.removeprefix(prefix) in spec.device_names for name in edits.cdi_devices)


def test_a_mig_device_without_capability_entries_is_left_out_with_a_note() -> None:
    n = node("a100-mig-mixed")
    gpu = n.gpus[3]
    minors = dict(n.mig_minors)
    del minors[f"gpu{gpu.minor}/gi2/access"]
    specs = build_specs(replace(n, mig_minors=minors), FACTS, settings(mig_strategy="mixed"))
    assert "MIG-d9e15001-0aea-4bee-ec3d-21ed17adfdf5" not in specs.specs[0].device_names
    assert len(specs.notes) == 1 and "gpu3/gi2/access" in specs.notes[0]


def test_hooks_follow_the_hook_path_and_can_be_disabled() -> None:
    n = node("h200")
    edits = build_specs(n, FACTS, settings(nvidia_cdi_hook_path="/usr/local/bin/nvidia-cdi-hook")
                        ).specs[0].doc["containerEdits"]
    assert [h["args"][:2] for h in edits["hooks"]][2:] == [
        ["nvidia-cdi-hook", "enable-cuda-compat"], ["nvidia-cdi-hook", "update-ldcache"],
        ["nvidia-cdi-hook", "disable-device-node-modification"], ["nvidia-cdi-hook", "update-application-profile"]]
    assert {h["path"] for h in edits["hooks"]} == {"/usr/local/bin/nvidia-cdi-hook"}
    edits = build_specs(n, FACTS, settings(cdi_disable_hooks="create-symlinks,update-ldcache")
                        ).specs[0].doc["containerEdits"]
    assert [h["args"][2] for h in edits["hooks"]] == [
        "enable-cuda-compat", "disable-device-node-modification", "update-application-profile"]
    edits = build_specs(n, FACTS, settings(cdi_disable_hooks="all")).specs[0].doc["containerEdits"]
    assert "hooks" not in edits


def test_a_library_without_links_and_no_graphics_library_gives_fewer_links() -> None:
    facts = replace(FACTS, libraries=(Library(f"/usr/lib64/libcuda.so.{VERSION}"),
                                      Library(f"/usr/lib64/libnvidia-glcore.so.{VERSION}")))
    edits = build_specs(node("h200"), facts, settings()).specs[0].doc["containerEdits"]
    assert edits["env"][0] == "NVIDIA_CTK_LIBCUDA_DIR=/usr/lib64"
    assert edits["hooks"][0] == hook("create-symlinks", "--link", "libcuda.so.1::/usr/lib64/libcuda.so")
    assert edits["hooks"][1]["args"][2] == "enable-cuda-compat"


DRM = {H200_UUID: DrmNodes("0000:00:06.0", "/dev/dri/card1", "/dev/dri/renderD128", (44,))}


def test_drm_nodes_add_gids_and_need_0_7_0_unless_the_feature_flag_drops_them() -> None:
    facts = replace(FACTS, drm=DRM)
    spec = build_specs(node("h200"), facts, settings(driver_root="/run/nvidia/driver")).specs[0]
    device = spec.doc["devices"][0]["containerEdits"]
    assert spec.doc["cdiVersion"] == "0.7.0"
    assert device["additionalGids"] == [44]
    assert [n["path"] for n in device["deviceNodes"]] == ["/dev/nvidia0", "/dev/dri/card1", "/dev/dri/renderD128"]
    # The by-path links name container paths; the official plugin leaves /driver-root in them.
    assert device["hooks"] == [hook("create-symlinks",
                                    "--link", "../card1::/dev/dri/by-path/pci-0000:00:06.0-card",
                                    "--link", "../renderD128::/dev/dri/by-path/pci-0000:00:06.0-render")]
    assert "/driver-root" not in to_json(spec.doc)
    spec = build_specs(node("h200"), facts, settings(cdi_feature_flags="no-additional-gids-for-device-nodes")).specs[0]
    assert spec.doc["cdiVersion"] == "0.5.0"
    assert "additionalGids" not in spec.doc["devices"][0]["containerEdits"]


def test_feature_specs_when_on_and_present_and_their_names() -> None:
    facts = replace(FACTS, feature_nodes={"gds": ("/dev/nvidia-fs0", "/dev/nvidia-fs1"), "gdrcopy": ("/dev/gdrdrv",)},
                    feature_mounts={"gds": ("/etc/cufile.json",)},
                    imex_channels={0: "/dev/nvidia-caps-imex-channels/channel0"})
    s = settings(gds_enabled="true", mofed_enabled="true", gdrcopy_enabled="true", imex_channel_ids="0",
                 driver_root="/d")
    specs = build_specs(node("h200"), facts, s)
    assert [spec.cls for spec in specs.specs] == ["gpu", "gdrcopy", "gds", "imex-channel"]
    assert len(specs.notes) == 1 and "mofed" in specs.notes[0]  # on, but no /dev/infiniband nodes: dropped
    gds = specs.get("gds")
    assert gds is not None and gds.doc == {
        "cdiVersion": "0.5.0", "kind": "k8s.device-plugin.nvidia.com/gds",
        "devices": [{"name": "all", "containerEdits": {
            "deviceNodes": [node_entry("/dev/nvidia-fs0", "/d"), node_entry("/dev/nvidia-fs1", "/d")],
            "mounts": [mount("/etc/cufile.json", "/d")]}}]}
    imex = specs.get("imex-channel")
    assert imex is not None and imex.qualified_names() == ("k8s.device-plugin.nvidia.com/imex-channel=0",)
    assert imex.file_name() == "k8s.device-plugin.nvidia.com-imex-channel.json"
    # Allocate names the written classes only: mofed is on but has no spec.
    n = node("h200")
    cfg = load({"device_list_strategy": "cdi-cri", "gds_enabled": "true", "mofed_enabled": "true",
                "gdrcopy_enabled": "true", "imex_channel_ids": "0"}, {})
    resource = plan_tree(n, cfg).tree["nvidia.com/gpu"]
    edits = edits_for(resource, [H200_UUID], cfg, (), cdi_classes=specs.classes)
    assert edits.cdi_devices == (f"k8s.device-plugin.nvidia.com/gpu={H200_UUID}",
                                 "k8s.device-plugin.nvidia.com/imex-channel=0",
                                 "k8s.device-plugin.nvidia.com/gdrcopy=all", "k8s.device-plugin.nvidia.com/gds=all")
    # Without a spec written by nvdp (writing off), every enabled feature is named, as upstream.
    edits = edits_for(resource, [H200_UUID], cfg, (), cdi_classes=None)
    assert edits.cdi_devices[-3:] == tuple(f"k8s.device-plugin.nvidia.com/{c}=all" for c in ("gdrcopy", "gds", "mofed"))


def test_no_features_no_feature_specs_and_a_missing_imex_channel_is_not_handed_out() -> None:
    specs = build_specs(node("h200"), FACTS, settings(imex_channel_ids="0"))
    assert specs.classes == {"gpu"}
    assert "channel0" in specs.notes[0]
    cfg = load({"device_list_strategy": "cdi-annotations", "imex_channel_ids": "0"}, {})
    resource = plan_tree(node("h200"), cfg).tree["nvidia.com/gpu"]
    edits = edits_for(resource, [H200_UUID], cfg, (), lambda: "x", cdi_classes=specs.classes)
    assert edits.annotations == {"cdi.k8s.io/nvidia-device-plugin_x": f"k8s.device-plugin.nvidia.com/gpu={H200_UUID}"}


@pytest.mark.parametrize(
    ("doc", "version"),
    [
        pytest.param({"kind": "v.com/c", "devices": [{"name": "a", "containerEdits": {}}]}, "0.3.0", id="plain"),
        pytest.param({"kind": "v.com/c", "devices": [{"name": "a", "containerEdits": {
            "mounts": [{"hostPath": "/a", "containerPath": "/a", "type": "bind"}]}}]}, "0.4.0", id="mount type"),
        pytest.param({"kind": "v.com/c", "devices": [{"name": "0", "containerEdits": {}}]}, "0.5.0", id="digit name"),
        pytest.param({"kind": "v.com/c", "devices": [{"name": "a", "containerEdits": {}}], "containerEdits": {
            "deviceNodes": [{"path": "/dev/x", "hostPath": "/dev/x"}]}}, "0.5.0", id="hostPath"),
        pytest.param({"kind": "v.com/c.d", "devices": [{"name": "a", "containerEdits": {}}]}, "0.6.0", id="dot class"),
        pytest.param({"kind": "v.com/c", "annotations": {"a": "b"}, "devices": []}, "0.6.0", id="annotations"),
        pytest.param({"kind": "v.com/c", "devices": [{"name": "a", "containerEdits": {"additionalGids": [5]}}]},
                     "0.7.0", id="additionalGids"),
    ],
)
def test_required_version(doc: dict[str, Any], version: str) -> None:
    assert required_version(doc) == version


@pytest.mark.parametrize(
    ("cli", "env", "message"),
    [
        pytest.param({"cdi_feature_flags": "no-additional-gids,bogus"}, {}, "invalid --cdi-feature-flags", id="flag"),
        pytest.param({}, {"CDI_FEATURE_FLAGS": "typo"},
                     "invalid CDI_FEATURE_FLAGS: invalid value: 'typo' (allowed: no-additional-gids-for-device-nodes",
                     id="env"),  # the error names what was given (issue 12): the env var
    ],
)
def test_unknown_feature_flags_are_config_errors(cli: dict[str, str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=r"cdi-feature-flags|CDI_FEATURE_FLAGS") as info:
        load(cli, env)
    assert message in str(info.value)


def test_feature_flags_with_upstream_names_load_and_unknown_hooks_are_a_note() -> None:
    cfg = load({"cdi_feature_flags": "no-additional-gids-for-device-nodes,disable-nvsandbox-utils",
                "cdi_disable_hooks": "update-ldcache,chmod,nonsense"}, {})
    assert cfg.cdi_feature_flags == ("no-additional-gids-for-device-nodes", "disable-nvsandbox-utils")
    assert cfg.cdi_disable_hooks == ("update-ldcache", "chmod", "nonsense")
    specs = build_specs(node("h200"), FACTS, SpecSettings.from_config(cfg))
    assert specs.notes == (
        "--cdi-disable-hooks: 'nonsense' names no hook; it disables nothing (known: create-symlinks, "
        "enable-cuda-compat, update-ldcache, disable-device-node-modification, update-application-profile, all)",)
    assert "update-ldcache" not in to_json(specs.specs[0].doc)
    assert load({}, {"NVDP_CDI_SPEC_DIR": ""}).cdi_spec_dir == ""
    assert load({}, {}).cdi_spec_dir == "/var/run/cdi"
