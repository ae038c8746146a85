"""Allocate answers, checked against the official plugin's (upstream-behaviour.md section 4)."""

from __future__ import annotations

from typing import Any

import pytest

from nvdp.config.load import load
from nvdp.config.options import Config, Sharing, TimeSlicingResource
from nvdp.core.container import DeviceSpec, Mount, edits_for
from nvdp.core.devices import Device, Health, Resource
from nvdp.errors import AllocationError, UnhealthyDevice, UnknownDevice

CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")


def gpu(i: int, health: Health = Health.HEALTHY, reason: str = "") -> Device:
    return Device(id=f"GPU-{i}", gpu_uuid=f"GPU-{i}", index=str(i), paths=(f"/dev/nvidia{i}",), health=health,
                  reason=reason)


RESOURCE = Resource("nvidia.com/gpu", tuple(gpu(i) for i in range(4)))


def cfg(**cli: Any) -> Config:
    return load(cli, {})


def test_envvar_uuid() -> None:
    edits = edits_for(RESOURCE, ["GPU-2", "GPU-0"], cfg(), CONTROL)
    assert edits.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-2,GPU-0"}
    assert edits.mounts == () and edits.devices == () and edits.annotations == {} and edits.cdi_devices == ()


def test_envvar_removes_duplicates_keeping_order() -> None:
    edits = edits_for(RESOURCE, ["GPU-1", "GPU-0", "GPU-1"], cfg(), CONTROL)
    assert edits.envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-1,GPU-0"


def test_index_strategy() -> None:
    edits = edits_for(RESOURCE, ["GPU-3", "GPU-1"], cfg(device_id_strategy="index"), CONTROL)
    assert edits.envs == {"NVIDIA_VISIBLE_DEVICES": "3,1"}


def test_volume_mounts() -> None:
    edits = edits_for(RESOURCE, ["GPU-0", "GPU-2"], cfg(device_list_strategy=["volume-mounts"]), CONTROL)
    assert edits.envs == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"}
    assert edits.mounts == (
        Mount("/var/run/nvidia-container-devices/GPU-0", "/dev/null", False),
        Mount("/var/run/nvidia-container-devices/GPU-2", "/dev/null", False),
    )


def test_envvar_and_volume_mounts_together() -> None:
    edits = edits_for(RESOURCE, ["GPU-1"], cfg(device_list_strategy=["envvar,volume-mounts"]), CONTROL)
    assert edits.envs == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"}
    assert [m.container_path for m in edits.mounts] == ["/var/run/nvidia-container-devices/GPU-1"]


@pytest.mark.parametrize(
    ("driver_root", "prefix"),
    [pytest.param(None, "", id="no driver root"),
     pytest.param("/run/nvidia/driver", "/run/nvidia/driver", id="driver root")],
)
def test_pass_device_specs(driver_root: str | None, prefix: str) -> None:
    cli: dict[str, Any] = {"pass_device_specs": "true"}
    if driver_root:
        cli["driver_root"] = driver_root
    edits = edits_for(RESOURCE, ["GPU-1", "GPU-3"], cfg(**cli), CONTROL[:3])
    expected = ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia1", "/dev/nvidia3"]
    assert edits.devices == tuple(DeviceSpec(p, prefix + p, "rw") for p in expected)
    assert edits.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-1,GPU-3"}


def test_dev_root_wins_over_driver_root_for_host_paths() -> None:
    edits = edits_for(RESOURCE, ["GPU-0"], cfg(pass_device_specs="true", driver_root="/drv", dev_root="/"), ())
    assert edits.devices == (DeviceSpec("/dev/nvidia0", "/dev/nvidia0"),)


def test_cdi_annotations_only_injects_nothing_else() -> None:
    config = cfg(device_list_strategy=["cdi-annotations"], pass_device_specs="true")
    edits = edits_for(RESOURCE, ["GPU-0", "GPU-1"], config, CONTROL, new_annotation_id=lambda: "uuid")
    assert edits.annotations == {
        "cdi.k8s.io/nvidia-device-plugin_uuid": "k8s.device-plugin.nvidia.com/gpu=GPU-0,"
        "k8s.device-plugin.nvidia.com/gpu=GPU-1"
    }
    assert edits.envs == {} and edits.devices == () and edits.mounts == ()


def test_cdi_cri_and_custom_prefix() -> None:
    config = cfg(device_list_strategy=["envvar,cdi-cri,cdi-annotations"], cdi_annotation_prefix="custom.io/",
                 device_id_strategy="index")
    edits = edits_for(RESOURCE, ["GPU-2"], config, CONTROL, new_annotation_id=lambda: "x")
    assert edits.cdi_devices == ("k8s.device-plugin.nvidia.com/gpu=2",)
    assert edits.annotations == {"custom.io/nvidia-device-plugin_x": "k8s.device-plugin.nvidia.com/gpu=2"}
    assert edits.envs == {"NVIDIA_VISIBLE_DEVICES": "2"}


def test_feature_envs_and_imex() -> None:
    config = cfg(gds_enabled="true", mofed_enabled="true", gdrcopy_enabled="true", imex_channel_ids="0",
                 pass_device_specs="true")
    edits = edits_for(RESOURCE, ["GPU-0"], config, ())
    assert edits.envs == {
        "NVIDIA_GDS": "enabled", "NVIDIA_MOFED": "enabled", "NVIDIA_GDRCOPY": "enabled",
        "NVIDIA_VISIBLE_DEVICES": "GPU-0", "NVIDIA_IMEX_CHANNELS": "0",
    }
    assert [d.container_path for d in edits.devices] == ["/dev/nvidia0", "/dev/nvidia-caps-imex-channels/channel0"]


def test_unknown_id_is_worded_as_the_official_plugin() -> None:
    with pytest.raises(UnknownDevice) as info:
        edits_for(RESOURCE, ["GPU-0", "GPU-9"], cfg(), CONTROL)
    assert str(info.value) == 'invalid allocation request for "nvidia.com/gpu": invalid request: unknown device: GPU-9'


def test_unhealthy_id_is_refused() -> None:
    resource = Resource("nvidia.com/gpu", (gpu(0), gpu(1, Health.UNHEALTHY, "XID 79")))
    with pytest.raises(UnhealthyDevice) as info:
        edits_for(resource, ["GPU-1"], cfg(), CONTROL)
    assert str(info.value) == (
        'invalid allocation request for "nvidia.com/gpu": invalid request: unhealthy device: GPU-1 (XID 79)'
    )


def shared(fail_greater_than_one: bool) -> tuple[Resource, Config]:
    replicas = tuple(
        Device(id=f"GPU-a::{n}", gpu_uuid="GPU-a", index="0", paths=("/dev/nvidia0",), replica=n) for n in range(4)
    )
    sharing = Sharing(fail_greater_than_one, resources=(TimeSlicingResource("nvidia.com/gpu", 4),))
    return Resource("nvidia.com/gpu", replicas), Config(sharing=sharing, pass_device_specs=True)


def test_replicas_collapse_to_one_gpu() -> None:
    resource, config = shared(fail_greater_than_one=False)
    edits = edits_for(resource, ["GPU-a::1", "GPU-a::3"], config, ("/dev/nvidiactl",))
    assert edits.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-a"}
    # The official plugin repeats /dev/nvidia0 here; we pass each node once.
    assert [d.container_path for d in edits.devices] == ["/dev/nvidiactl", "/dev/nvidia0"]


def test_fail_requests_greater_than_one() -> None:
    resource, config = shared(fail_greater_than_one=True)
    with pytest.raises(AllocationError) as info:
        edits_for(resource, ["GPU-a::1", "GPU-a::3"], config, ())
    assert str(info.value) == (
        'invalid allocation request for "nvidia.com/gpu": invalid request: '
        "maximum request size for shared resources is 1; found 2"
    )
    assert edits_for(resource, ["GPU-a::2"], config, ()).envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-a"}
