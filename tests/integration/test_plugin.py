"""The real plugin (in-process) against the strict fake kubelet, on simulated nodes."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from nvdp.app.plugin import Plugin
from nvdp.config.options import Config
from nvdp.kubelet._proto import api_pb2 as pb
from nvdp.kubelet._proto import api_pb2_grpc as pb_grpc
from nvdp.testing import FakeKubelet, eventually, stays_true
from tests.conftest import running_plugin

GPU = "nvidia.com/gpu"
MakeConfig = Callable[..., Config]


async def test_registers_and_streams_devices_with_numa(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("dgx-h100")) as plugin:
        endpoint = await kubelet.wait_registered(GPU)
        assert endpoint.endpoint == "nvidia-gpu.sock"
        assert endpoint.options.get_preferred_allocation_available is True
        assert endpoint.options.pre_start_required is False
        assert plugin.node is not None
        assert list(endpoint.devices) == [g.uuid for g in plugin.node.gpus]
        numa = [[n.ID for n in d.topology.nodes] for d in endpoint.devices.values()]
        assert numa == [[0]] * 4 + [[1]] * 4
        assert all(d.health == "Healthy" for d in endpoint.devices.values())
    assert kubelet.errors == []


async def test_device_without_numa_has_no_topology(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("h200")):
        endpoint = await kubelet.wait_registered(GPU)
        (device,) = endpoint.devices.values()
        assert device.ID == "GPU-561c5ac8-2525-530f-236a-f8e1e82e0c3b"
        assert not device.HasField("topology")


@pytest.mark.parametrize(
    ("cli", "envs", "mounts", "specs"),
    [
        pytest.param({}, {"NVIDIA_VISIBLE_DEVICES": "{u0},{u1}"}, [], [], id="envvar uuid"),
        pytest.param({"device_id_strategy": "index"}, {"NVIDIA_VISIBLE_DEVICES": "0,1"}, [], [], id="envvar index"),
        pytest.param(
            {"device_list_strategy": ["volume-mounts"]},
            {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
            [("/var/run/nvidia-container-devices/{u0}", "/dev/null"),
             ("/var/run/nvidia-container-devices/{u1}", "/dev/null")],
            [],
            id="volume-mounts",
        ),
        pytest.param(
            {"pass_device_specs": "true"},
            {"NVIDIA_VISIBLE_DEVICES": "{u0},{u1}"},
            [],
            [("/dev/nvidiactl", "/dev/nvidiactl"), ("/dev/nvidia-uvm", "/dev/nvidia-uvm"),
             ("/dev/nvidia-uvm-tools", "/dev/nvidia-uvm-tools"), ("/dev/nvidia0", "/dev/nvidia0"),
             ("/dev/nvidia1", "/dev/nvidia1")],
            id="pass-device-specs",
        ),
        pytest.param(
            {"pass_device_specs": "true", "driver_root": "/run/nvidia/driver"},
            {"NVIDIA_VISIBLE_DEVICES": "{u0},{u1}"},
            [],
            [("/dev/nvidiactl", "/run/nvidia/driver/dev/nvidiactl"),
             ("/dev/nvidia-uvm", "/run/nvidia/driver/dev/nvidia-uvm"),
             ("/dev/nvidia-uvm-tools", "/run/nvidia/driver/dev/nvidia-uvm-tools"),
             ("/dev/nvidia0", "/run/nvidia/driver/dev/nvidia0"),
             ("/dev/nvidia1", "/run/nvidia/driver/dev/nvidia1")],
            id="pass-device-specs with driver root",
        ),
    ],
)
async def test_allocate_variants(
    kubelet: FakeKubelet,
    make_config: MakeConfig,
    cli: dict[str, object],
    envs: dict[str, str],
    mounts: list[tuple[str, str]],
    specs: list[tuple[str, str]],
) -> None:
    async with running_plugin(make_config("dgx-h100", **cli)) as plugin:
        await kubelet.wait_registered(GPU)
        assert plugin.node is not None
        u = {f"u{i}": g.uuid for i, g in enumerate(plugin.node.gpus)}
        response = await kubelet.allocate(GPU, [u["u0"], u["u1"]])
        assert dict(response.envs) == {k: v.format(**u) for k, v in envs.items()}
        assert [(m.container_path, m.host_path, m.read_only) for m in response.mounts] == [
            (c.format(**u), h, False) for c, h in mounts
        ]
        assert [(d.container_path, d.host_path, d.permissions) for d in response.devices] == [
            (c, h, "rw") for c, h in specs
        ]


async def test_unknown_id_is_invalid_argument_naming_it(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("pcie-l40s")):
        endpoint = await kubelet.wait_registered(GPU)
        good = next(iter(endpoint.devices))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kubelet.allocate(GPU, [good, "GPU-does-not-exist"])
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "GPU-does-not-exist" in (info.value.details() or "")
        assert GPU in (info.value.details() or "")
        # The plugin keeps serving after a refused request.
        assert (await kubelet.allocate(GPU, [good])).envs["NVIDIA_VISIBLE_DEVICES"] == good


async def test_options_prestart_and_preferred(
    kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path
) -> None:
    async with running_plugin(make_config("dgx-h100")) as plugin:
        endpoint = await kubelet.wait_registered(GPU)
        assert plugin.node is not None
        uuids = [g.uuid for g in plugin.node.gpus]
        async with grpc.aio.insecure_channel(f"unix://{plugin_dir}/nvidia-gpu.sock") as channel:
            stub = pb_grpc.DevicePluginStub(channel)
            options = await stub.GetDevicePluginOptions(pb.Empty())
            assert options == endpoint.options
            assert await stub.PreStartContainer(pb.PreStartContainerRequest(devices_ids=uuids[:1])) == (
                pb.PreStartContainerResponse()
            )
        # must_include on NUMA node 1 keeps the rest of the pick on node 1.
        ids = await kubelet.preferred_allocation(GPU, uuids, [uuids[5]], 3)
        assert ids[0] == uuids[5] and len(ids) == 3
        assert {uuids.index(i) for i in ids} <= {4, 5, 6, 7}


async def test_kubelet_restart_reregisters(kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path) -> None:
    async with running_plugin(make_config("dgx-h100")) as plugin:
        await kubelet.wait_registered(GPU)
        for _ in range(3):
            await kubelet.restart()
            endpoint = await kubelet.wait_registered(GPU, min_devices=8)
            assert (await kubelet.allocate(GPU, list(endpoint.devices)[:1])).envs
        assert sorted(p.name for p in plugin_dir.iterdir()) == ["kubelet.sock", "nvidia-gpu.sock"]
        assert plugin.manager.kubelet_restarts >= 3
    registrations = [e for e in kubelet.events if e.kind == "register"]
    assert len(registrations) == 4


async def test_kubelet_absent_then_present(plugin_dir: Path, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("pcie-l40s")) as plugin:
        # The plugin retries with back-off while there is no kubelet.
        await eventually(lambda: plugin.manager.registration_failures >= 2, "two failed registrations")
        assert not plugin.manager.all_registered
        async with FakeKubelet(str(plugin_dir)) as kubelet:
            await kubelet.wait_registered(GPU, min_devices=4)


async def test_kubelet_refusing_then_accepting(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    kubelet.refuse_with = "not today"
    async with running_plugin(make_config("pcie-l40s")):
        await kubelet.wait_for(lambda: sum(e.kind == "rejected" for e in kubelet.events) >= 2)
        kubelet.refuse_with = None
        await kubelet.wait_registered(GPU)


async def test_stop_removes_sockets(kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX) as stale:  # left behind by a killed plugin: a socket nobody listens on
        stale.bind(str(plugin_dir / "nvidia-gpu.sock"))
    async with running_plugin(make_config("pcie-l40s")):
        await kubelet.wait_registered(GPU)
    assert sorted(p.name for p in plugin_dir.iterdir()) == ["kubelet.sock"]


async def test_reload_applies_new_config_and_keeps_unchanged_streams(
    kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path
) -> None:
    config_file = plugin_dir / "config.yaml"
    config_file.write_text("version: v1\n")
    cfg = make_config("pcie-l40s", config_file=str(config_file))
    current = {"cfg": cfg}
    async with running_plugin(cfg, reload_config=lambda: current["cfg"]) as plugin:
        endpoint = await kubelet.wait_registered(GPU)
        updates = endpoint.updates

        await plugin.reload()  # nothing changed: the same stream, no new message

        def same_stream() -> bool:
            return kubelet.plugins[GPU] is endpoint and endpoint.connected and endpoint.updates == updates

        await stays_true(same_stream, 0.2, "the same stream and no new message after a reload that changed nothing")
        assert kubelet.plugins[GPU] is endpoint and endpoint.connected and endpoint.updates == updates

        config_file.write_text(
            "version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: true\n"
            "    resources: [{name: nvidia.com/gpu, replicas: 2}]\n"
        )
        current["cfg"] = make_config("pcie-l40s", config_file=str(config_file))
        await plugin.reload()
        shared = await kubelet.wait_registered("nvidia.com/gpu.shared", min_devices=8)
        assert all("::" in i for i in shared.devices)
        await kubelet.wait_for(lambda: not endpoint.connected)
        assert not (plugin_dir / "nvidia-gpu.sock").exists()


async def test_reload_with_bad_config_keeps_serving(
    kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path
) -> None:
    config_file = plugin_dir / "config.yaml"
    config_file.write_text("version: v1\n")
    cfg = make_config("pcie-l40s", config_file=str(config_file))

    def reload_config() -> Config:
        return make_config("pcie-l40s", config_file=str(config_file))

    async with running_plugin(cfg, reload_config=reload_config) as plugin:
        endpoint = await kubelet.wait_registered(GPU)
        config_file.write_text("version: v9\n")
        await plugin.reload()
        assert endpoint.connected and plugin.manager.all_registered
        assert (await kubelet.allocate(GPU, list(endpoint.devices)[:1])).envs


@pytest.mark.parametrize(
    ("change", "new_backend"),
    [
        pytest.param({"dev_root": "/run/nvidia/driver"}, False, id="dev root: only device specs change"),
        pytest.param({"driver_root": "/run/nvidia/driver"}, False, id="host driver root: only device specs"),
        pytest.param({"container_driver_root": "/other"}, True, id="container driver root: where NVML loads"),
        pytest.param({"simulate": "h200"}, True, id="another simulated node"),
    ],
)
async def test_reload_opens_a_new_backend_only_when_discovery_depends_on_the_change(
    kubelet: FakeKubelet, make_config: MakeConfig, change: dict[str, str], new_backend: bool
) -> None:
    cfg = make_config("pcie-l40s")
    values = {"profile": "pcie-l40s", **{("profile" if k == "simulate" else k): v for k, v in change.items()}}
    new_cfg = make_config(**values)
    async with running_plugin(cfg, reload_config=lambda: new_cfg) as plugin:
        await kubelet.wait_registered(GPU)
        backend = plugin.backend
        await plugin.reload()
        assert plugin.cfg is new_cfg
        assert (plugin.backend is not backend) == new_backend


async def test_reload_whose_backend_cannot_open_keeps_serving(
    kubelet: FakeKubelet, make_config: MakeConfig
) -> None:
    cfg = make_config("pcie-l40s")
    bad = make_config("no-such-profile")  # valid text; the backend factory rejects it (ConfigError)
    async with running_plugin(cfg, reload_config=lambda: bad) as plugin:
        endpoint = await kubelet.wait_registered(GPU)
        backend = plugin.backend
        await plugin.reload()
        assert plugin.cfg is cfg and plugin.backend is backend
        assert endpoint.connected and plugin.manager.all_registered


async def test_empty_kubelet_socket_serves_without_registering(
    make_config: MakeConfig, plugin_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from nvdp.kubelet.manager import DEFAULT_SOCKET_DIR
    from nvdp.ops.readiness import readiness

    cfg = make_config("pcie-l40s", kubelet_socket="")
    assert Plugin(cfg).manager.socket_dir == DEFAULT_SOCKET_DIR  # not the working directory
    caplog.set_level(logging.INFO, logger="nvdp")
    async with running_plugin(cfg, socket_dir=str(plugin_dir)) as plugin:
        # Once it says so, the registration task has ended: nothing will register later.
        await eventually(lambda: any(r.getMessage().startswith("Skipping registration") for r in caplog.records),
                         "the log line that registration is skipped")
        assert sorted(p.name for p in plugin_dir.iterdir()) == ["nvidia-gpu.sock"]
        assert plugin.manager.registered == set() and plugin.manager.registration_failures == 0
        assert readiness(plugin.view.state()).ok and plugin.manager.all_registered
        async with grpc.aio.insecure_channel(f"unix://{plugin_dir}/nvidia-gpu.sock") as channel:
            stream = pb_grpc.DevicePluginStub(channel).ListAndWatch(pb.Empty())
            first = await stream.read()
            assert isinstance(first, pb.ListAndWatchResponse)  # not the end of the stream
            assert len(first.devices) == 4
            stream.cancel()
    skipped = [r for r in caplog.records if r.getMessage().startswith("Skipping registration")]
    assert len(skipped) == 1
    # Nothing to warn about but the simulated node itself (every simulated start says so).
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warned if not w.startswith("SIMULATED NODE")]


async def test_no_devices_fails_start_when_asked(tmp_path: Path, make_config: MakeConfig) -> None:
    from nvdp.errors import NoDevicesFound

    empty = tmp_path / "empty.yaml"
    empty.write_text("gpus: []\n")
    with pytest.raises(NoDevicesFound):
        async with running_plugin(make_config(str(empty))):
            pass


async def test_no_devices_idles_when_not_failing(
    tmp_path: Path, make_config: MakeConfig, kubelet: FakeKubelet
) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("gpus: []\n")
    with_gpus = make_config("pcie-l40s", fail_on_init_error="false")
    async with running_plugin(make_config(str(empty), fail_on_init_error="false"),
                              reload_config=lambda: with_gpus) as plugin:
        assert plugin.init_error is not None
        assert plugin.manager.servers == {}
        # SIGHUP retries: with GPUs now present (a driver came up), it serves.
        await plugin.reload()
        await kubelet.wait_registered(GPU, min_devices=4)


async def test_folder_deleted_and_recreated(kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path) -> None:
    import shutil

    async with running_plugin(make_config("pcie-l40s")):
        await kubelet.wait_registered(GPU)
        await kubelet.stop()
        shutil.rmtree(plugin_dir)
        # Part of the scenario, not a wait: the folder stays gone while the plugin handles the
        # deletion events (it waits for the folder to come back; there is nothing to observe).
        await asyncio.sleep(0.3)
        plugin_dir.mkdir()
        await kubelet.start()
        await kubelet.wait_registered(GPU, min_devices=4, timeout=15)
        assert (plugin_dir / "nvidia-gpu.sock").exists()
