"""MIG strategies, Allocate answers and run-time layout changes, through the strict fake kubelet."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from nvdp.app.discovery import BackendFactory
from nvdp.backends.simulated.backend import SimulatedBackend
from nvdp.config.options import Config
from nvdp.errors import MigConfigError
from nvdp.testing import FakeKubelet
from tests.conftest import running_plugin

GPU = "nvidia.com/gpu"
MakeConfig = Callable[..., Config]
CONTROL = ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]


def backend_of(profile: str) -> tuple[SimulatedBackend, BackendFactory]:
    """A simulated backend the test keeps a hand on (to change the layout at run time)."""
    backend = SimulatedBackend(profile)
    return backend, lambda cfg: backend


def counts(kubelet: FakeKubelet) -> dict[str, int]:
    return {name: len(p.devices) for name, p in kubelet.plugins.items() if p.connected}


async def wait_counts(kubelet: FakeKubelet, expected: dict[str, int]) -> None:
    await kubelet.wait_for(lambda: counts(kubelet) == expected)


# --- strategies on the built-in profiles ---------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "strategy", "expected"),
    [
        pytest.param("a100-mig-mixed", "none", {GPU: 8}, id="a100 none: every GPU whole"),
        pytest.param(
            "a100-mig-mixed", "mixed",
            {GPU: 1, "nvidia.com/mig-1g.5gb": 24, "nvidia.com/mig-2g.10gb": 3, "nvidia.com/mig-3g.20gb": 3},
            id="a100 mixed",
        ),
        pytest.param("h100-mig-single", "single", {GPU: 56}, id="h100 single"),
        pytest.param("h100-mig-single", "mixed", {"nvidia.com/mig-1g.10gb": 56}, id="h100 mixed"),
        pytest.param("h100-mig-single", "none", {GPU: 8}, id="h100 none"),
        pytest.param(
            "h200-mig", "mixed",
            {"nvidia.com/mig-3g.71gb": 1, "nvidia.com/mig-2g.35gb": 1, "nvidia.com/mig-1g.18gb.me": 1,
             "nvidia.com/mig-1g.18gb": 1},
            id="h200 mixed",
        ),
        pytest.param("dgx-h100", "single", {GPU: 8}, id="single without MIG GPUs behaves like none"),
        pytest.param("dgx-h100", "mixed", {GPU: 8}, id="mixed without MIG GPUs"),
    ],
)
async def test_strategy_serves(
    kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path, profile: str, strategy: str,
    expected: dict[str, int],
) -> None:
    async with running_plugin(make_config(profile, mig_strategy=strategy)):
        await wait_counts(kubelet, expected)
        sockets = sorted(p.name for p in plugin_dir.iterdir() if p.name != "kubelet.sock")
        assert sockets == sorted(f"nvidia-{name.split('/')[1]}.sock" for name in expected)
    assert kubelet.errors == []


async def test_mig_devices_are_advertised_by_mig_uuid_with_parent_numa(
    kubelet: FakeKubelet, make_config: MakeConfig
) -> None:
    async with running_plugin(make_config("a100-mig-mixed", mig_strategy="mixed")) as plugin:
        endpoint = await kubelet.wait_registered("nvidia.com/mig-3g.20gb", min_devices=3)
        assert plugin.node is not None
        gpus = plugin.node.gpus
        assert list(endpoint.devices) == [gpus[i].mig_devices[0].uuid for i in (3, 4, 5)]
        assert all(i.startswith("MIG-") for i in endpoint.devices)
        assert [[n.ID for n in d.topology.nodes] for d in endpoint.devices.values()] == [[0], [1], [1]]


@pytest.mark.parametrize(
    ("profile", "change", "message"),
    [
        pytest.param("a100-mig-mixed", None,
                     "invalid MIG configuration: at least one device with migEnabled=true was not configured "
                     "correctly: device 7 has no MIG devices configured", id="a MIG GPU without MIG devices"),
        pytest.param("h200-mig", None,
                     "invalid MIG configuration: more than one MIG device type present on node",
                     id="more than one MIG type"),
        pytest.param("h100-mig-single", (7, [], False),
                     "all devices on the node must be configured with the same migEnabled value",
                     id="MIG enabled and disabled GPUs"),
        pytest.param("h100-mig-single", (2, ["1g.10gb+me"], True),
                     "invalid MIG configuration: more than one MIG device type present on node",
                     id="a media-extension variant is another type"),
    ],
)
async def test_single_refuses_to_start(
    make_config: MakeConfig, profile: str, change: tuple[int, list[str], bool] | None, message: str
) -> None:
    backend, factory = backend_of(profile)
    if change is not None:
        gpu, devices, enabled = change
        backend.set_mig_layout(gpu, devices, enabled=enabled)
    with pytest.raises(MigConfigError) as info:
        async with running_plugin(make_config(profile, mig_strategy="single"), backend_factory=factory):
            pass
    assert str(info.value).startswith(message)


async def test_mixed_skips_unexposable_profile_and_serves_the_rest(
    kubelet: FakeKubelet, make_config: MakeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    backend, factory = backend_of("a100-mig-mixed")
    backend.set_mig_layout(0, ["1c.2g.10gb", "1g.5gb", "1g.5gb"])
    caplog.set_level(logging.WARNING)
    async with running_plugin(make_config("a100-mig-mixed", mig_strategy="mixed"), backend_factory=factory):
        await wait_counts(kubelet, {
            GPU: 1, "nvidia.com/mig-1g.5gb": 19, "nvidia.com/mig-2g.10gb": 3, "nvidia.com/mig-3g.20gb": 3,
        })
    skipped = [r for r in caplog.records if r.levelno == logging.ERROR and "1c.2g.10gb" in r.getMessage()]
    assert len(skipped) == 1
    assert getattr(skipped[0], "device", None) == backend.node.gpus[0].mig_devices[0].uuid
    empty = [r for r in caplog.records if r.levelno == logging.WARNING and "GPU 7 has MIG enabled" in r.getMessage()]
    assert len(empty) == 1


# --- Allocate ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cli", "visible", "specs"),
    [
        pytest.param({}, "{uuid}", [], id="uuid"),
        pytest.param({"device_id_strategy": "index"}, "0:1", [], id="index i:j"),
        # gi 2 (slot 1 + 1), ci 0 on GPU minor 0: nvidia-cap(3 + 2*9) and the next one.
        pytest.param({"pass_device_specs": "true"}, "{uuid}",
                     [*CONTROL, "/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap21", "/dev/nvidia-caps/nvidia-cap22"],
                     id="pass-device-specs with capability nodes"),
    ],
)
async def test_allocate_mig_device(
    kubelet: FakeKubelet, make_config: MakeConfig, cli: dict[str, str], visible: str, specs: list[str]
) -> None:
    resource = "nvidia.com/mig-2g.35gb"
    async with running_plugin(make_config("h200-mig", mig_strategy="mixed", **cli)) as plugin:
        endpoint = await kubelet.wait_registered(resource)
        assert plugin.node is not None
        mig = plugin.node.gpus[0].mig_devices[1]
        assert list(endpoint.devices) == [mig.uuid]
        response = await kubelet.allocate(resource, [mig.uuid])
        assert dict(response.envs) == {"NVIDIA_VISIBLE_DEVICES": visible.format(uuid=mig.uuid)}
        assert [(d.container_path, d.host_path, d.permissions) for d in response.devices] == [
            (p, p, "rw") for p in specs
        ]


async def test_single_allocates_mig_devices_of_several_gpus(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    cfg = make_config("h100-mig-single", mig_strategy="single", pass_device_specs="true", device_id_strategy="index")
    async with running_plugin(cfg) as plugin:
        await kubelet.wait_registered(GPU, min_devices=56)
        assert plugin.node is not None
        chosen = [plugin.node.gpus[0].mig_devices[6].uuid, plugin.node.gpus[5].mig_devices[0].uuid]
        response = await kubelet.allocate(GPU, chosen)
        assert response.envs["NVIDIA_VISIBLE_DEVICES"] == "0:6,5:0"
        # GPU 5 (minor 5): gi 1 -> 3 + 5*135 + 9 = 687; GPU 0 gi 7 -> 3 + 63 = 66.
        assert [d.container_path for d in response.devices] == [
            *CONTROL, "/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap66", "/dev/nvidia-caps/nvidia-cap67",
            "/dev/nvidia5", "/dev/nvidia-caps/nvidia-cap687", "/dev/nvidia-caps/nvidia-cap688",
        ]
        preferred = await kubelet.preferred_allocation(GPU, list(kubelet.plugin(GPU).devices), [chosen[1]], 3)
        assert preferred[0] == chosen[1] and len(preferred) == 3


def h200_missing(tmp_path: Path, missing: str) -> str:
    """The h200-mig profile with one entry missing from the simulated mig-minors file."""
    from importlib import resources

    text = resources.files("nvdp.backends.simulated.profiles").joinpath("h200-mig.yaml").read_text()
    path = tmp_path / "h200-mig-missing.yaml"
    path.write_text(f"{text}\nmig_minors_missing: [{missing}]\n")
    return str(path)


async def test_missing_capability_entry_fails_only_that_device(
    kubelet: FakeKubelet, make_config: MakeConfig, tmp_path: Path
) -> None:
    profile = h200_missing(tmp_path, "gpu0/gi2/access")
    async with running_plugin(make_config(profile, mig_strategy="mixed", pass_device_specs="true")):
        broken = await kubelet.wait_registered("nvidia.com/mig-2g.35gb")
        (device,) = broken.devices.values()
        assert device.health == "Unhealthy"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kubelet.allocate("nvidia.com/mig-2g.35gb", [device.ID])
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details() or ""
        assert device.ID in details and "missing MIG capability gpu0/gi2/access" in details
        fine = await kubelet.wait_registered("nvidia.com/mig-3g.71gb")
        assert [d.health for d in fine.devices.values()] == ["Healthy"]
        assert (await kubelet.allocate("nvidia.com/mig-3g.71gb", list(fine.devices))).devices


async def test_missing_capability_entry_is_harmless_without_device_specs(
    kubelet: FakeKubelet, make_config: MakeConfig, tmp_path: Path
) -> None:
    profile = h200_missing(tmp_path, "gpu0/gi2/ci0/access")
    async with running_plugin(make_config(profile, mig_strategy="mixed")):
        endpoint = await kubelet.wait_registered("nvidia.com/mig-2g.35gb")
        (device,) = endpoint.devices.values()
        assert device.health == "Healthy"
        assert (await kubelet.allocate("nvidia.com/mig-2g.35gb", [device.ID])).envs


# --- layout changes at run time ------------------------------------------------------------------


async def test_rescan_serves_a_new_layout_and_keeps_unchanged_streams(
    kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path
) -> None:
    backend, factory = backend_of("a100-mig-mixed")
    cfg = make_config("a100-mig-mixed", mig_strategy="mixed", mig_rescan_interval="0.05")
    async with running_plugin(cfg, backend_factory=factory) as plugin:
        before = {GPU: 1, "nvidia.com/mig-1g.5gb": 24, "nvidia.com/mig-2g.10gb": 3, "nvidia.com/mig-3g.20gb": 3}
        await wait_counts(kubelet, before)
        streams = dict(kubelet.plugins)
        updates = {name: p.updates for name, p in streams.items()}
        inodes = {name: os.stat(plugin_dir / p.endpoint).st_ino for name, p in streams.items()}

        # GPU 7 gets partitioned: a new resource appears; nothing else changes.
        backend.set_mig_layout(7, ["7g.40gb"])
        await wait_counts(kubelet, {**before, "nvidia.com/mig-7g.40gb": 1})
        for name, endpoint in streams.items():
            assert kubelet.plugins[name] is endpoint and endpoint.connected
            assert endpoint.updates == updates[name], name
            assert os.stat(plugin_dir / endpoint.endpoint).st_ino == inodes[name]

        # GPUs 3-5 become one 7g.40gb each: 3g.20gb and 2g.10gb vanish, 1g.5gb shrinks.
        for gpu in (3, 4, 5):
            backend.set_mig_layout(gpu, ["7g.40gb"])
        await wait_counts(kubelet, {GPU: 1, "nvidia.com/mig-1g.5gb": 21, "nvidia.com/mig-7g.40gb": 4})
        assert not streams["nvidia.com/mig-3g.20gb"].connected
        assert not (plugin_dir / "nvidia-mig-3g.20gb.sock").exists()
        assert kubelet.plugins["nvidia.com/mig-1g.5gb"] is streams["nvidia.com/mig-1g.5gb"]
        assert kubelet.plugins[GPU] is streams[GPU] and streams[GPU].updates == updates[GPU]
        assert plugin.rescans >= 2
    registrations = [e.resource for e in kubelet.events if e.kind == "register"]
    assert sorted(registrations) == sorted([*before, "nvidia.com/mig-7g.40gb"])


async def test_sighup_picks_up_a_layout_change(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    backend, factory = backend_of("h100-mig-single")
    async with running_plugin(make_config("h100-mig-single", mig_strategy="mixed"), backend_factory=factory) as plugin:
        await wait_counts(kubelet, {"nvidia.com/mig-1g.10gb": 56})
        backend.set_mig_layout(0, ["3g.40gb", "3g.40gb"])
        plugin.request_reload()  # what the SIGHUP handler does
        await wait_counts(kubelet, {"nvidia.com/mig-1g.10gb": 49, "nvidia.com/mig-3g.40gb": 2})


async def test_rescan_without_change_sends_nothing(kubelet: FakeKubelet, make_config: MakeConfig) -> None:
    async with running_plugin(make_config("h200-mig", mig_strategy="mixed")) as plugin:
        await wait_counts(kubelet, {"nvidia.com/mig-3g.71gb": 1, "nvidia.com/mig-2g.35gb": 1,
                                    "nvidia.com/mig-1g.18gb.me": 1, "nvidia.com/mig-1g.18gb": 1})
        updates = {name: p.updates for name, p in kubelet.plugins.items()}
        assert await plugin.rescan() is False
        assert {name: p.updates for name, p in kubelet.plugins.items()} == updates
        assert plugin.rescans == 0


async def test_rescan_keeps_serving_through_an_invalid_layout(
    kubelet: FakeKubelet, make_config: MakeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    backend, factory = backend_of("h100-mig-single")
    async with running_plugin(make_config("h100-mig-single", mig_strategy="single"), backend_factory=factory) as plugin:
        endpoint = await kubelet.wait_registered(GPU, min_devices=56)
        backend.set_mig_layout(3, ["1g.20gb"])  # mig-parted half way: two MIG types
        caplog.set_level(logging.ERROR)
        assert await plugin.rescan() is False
        assert await plugin.rescan() is False
        failures = [r for r in caplog.records if "rescan: discovery failed" in r.getMessage()]
        assert len(failures) == 1  # logged once, not on every rescan
        assert endpoint.connected and len(endpoint.devices) == 56
        backend.set_mig_layout(3, ["1g.10gb"] * 6)  # valid again, one device fewer
        assert await plugin.rescan() is True
        await kubelet.wait_for(lambda: len(endpoint.devices) == 55)
        assert kubelet.plugins[GPU] is endpoint and endpoint.connected


async def test_rescan_starts_an_idle_plugin_once_the_layout_is_valid(
    kubelet: FakeKubelet, make_config: MakeConfig
) -> None:
    backend, factory = backend_of("h100-mig-single")
    backend.set_mig_layout(0, [])  # not partitioned yet
    cfg = make_config("h100-mig-single", mig_strategy="single", fail_on_init_error="false", mig_rescan_interval="0.05")
    async with running_plugin(cfg, backend_factory=factory) as plugin:
        assert isinstance(plugin.init_error, MigConfigError)
        assert plugin.manager.servers == {}
        backend.set_mig_layout(0, ["1g.10gb"] * 7)
        await kubelet.wait_registered(GPU, min_devices=56)
        assert plugin.init_error is None


# --- the command line ----------------------------------------------------------------------------


def test_single_error_exits_1_with_the_reason(plugin_dir: Path) -> None:
    from tests.integration.test_cli import clean_env, script

    result = subprocess.run(
        [script("nvidia-device-plugin"), "--simulate", "a100-mig-mixed", "--mig-strategy", "single",
         "--kubelet-socket", str(plugin_dir / "kubelet.sock")],
        env=clean_env(), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "device 7 has no MIG devices configured" in result.stdout + result.stderr
    assert sorted(p.name for p in plugin_dir.iterdir()) == []  # no socket was created


def test_devices_command_shows_where_each_mig_device_lands() -> None:
    from tests.integration.test_cli import clean_env, script

    result = subprocess.run(
        [script("nvdp"), "devices", "--simulate", "a100-mig-mixed", "--mig-strategy", "mixed", "--json"],
        env=clean_env(), capture_output=True, text=True, timeout=30, check=True,
    )
    report = json.loads(result.stdout)
    assert len(report["mig_devices"]) == 30
    by_index = {m["index"]: m for m in report["mig_devices"]}
    assert by_index["3:1"]["profile"] == "2g.10gb"
    assert by_index["3:1"]["resources"] == ["nvidia.com/mig-2g.10gb"]
    assert "warning: GPU 7 has MIG enabled but no MIG devices" in result.stderr

    table = subprocess.run(
        [script("nvdp"), "devices", "--simulate", "h200-mig"],  # strategy none: nothing advertised as MIG
        env=clean_env(), capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert "MIG DEVICE" in table and "1g.18gb+me" in table and "- (not advertised)" in table


async def test_layout_change_through_the_control_socket(
    kubelet: FakeKubelet, make_config: MakeConfig, plugin_dir: Path
) -> None:
    import asyncio

    from click.testing import CliRunner

    from nvdp.cli import main

    control = str(plugin_dir / "control.sock")
    cfg = make_config("a100-mig-mixed", mig_strategy="mixed", simulate_control=control)
    async with running_plugin(cfg) as plugin:
        before = {GPU: 1, "nvidia.com/mig-1g.5gb": 24, "nvidia.com/mig-2g.10gb": 3, "nvidia.com/mig-3g.20gb": 3}
        await wait_counts(kubelet, before)
        gpu_stream = kubelet.plugins[GPU]

        def inject(*args: str) -> tuple[int, str]:
            result = CliRunner().invoke(main, ["simulate", "inject", "--control", control, "mig-layout", *args])
            return result.exit_code, result.output

        code, output = await asyncio.to_thread(inject, "--gpu", "7", "--devices", "4g.20gb,2g.10gb,1g.5gb")
        assert (code, output) == (0, "GPU 7 MIG layout: 4g.20gb+2g.10gb+1g.5gb; the plugin serves it now\n")
        await wait_counts(kubelet, {**before, "nvidia.com/mig-4g.20gb": 1, "nvidia.com/mig-1g.5gb": 25,
                                    "nvidia.com/mig-2g.10gb": 4})

        code, output = await asyncio.to_thread(inject, "--gpu", "6", "--devices", "7g.40gb", "--no-rescan")
        assert code == 0 and output.endswith("(the plugin sees it on its next rescan or SIGHUP)\n")
        assert plugin.node is not None and not plugin.node.gpus[6].mig_enabled  # not applied yet
        plugin.request_reload()  # SIGHUP
        await kubelet.wait_for(lambda: "nvidia.com/mig-7g.40gb" in counts(kubelet) and GPU not in counts(kubelet))
        assert not gpu_stream.connected  # the last full GPU is gone, and with it nvidia.com/gpu

        code, output = await asyncio.to_thread(inject, "--gpu", "0", "--devices", "8g.99gb")
        assert code == 1 and "unknown MIG profile '8g.99gb'" in output


# --- health of MIG devices -----------------------------------------------------------------------


async def test_scoped_xid_marks_only_its_mig_device_and_unscoped_marks_all(
    kubelet: FakeKubelet, make_config: MakeConfig
) -> None:
    backend, factory = backend_of("h200-mig")
    async with running_plugin(make_config("h200-mig", mig_strategy="mixed"), backend_factory=factory) as plugin:
        await wait_counts(kubelet, {"nvidia.com/mig-3g.71gb": 1, "nvidia.com/mig-2g.35gb": 1,
                                    "nvidia.com/mig-1g.18gb.me": 1, "nvidia.com/mig-1g.18gb": 1})
        assert plugin.node is not None
        gpu = plugin.node.gpus[0]

        def states() -> dict[str, str]:
            return {d.ID: d.health for p in kubelet.plugins.values() for d in p.devices.values()}

        target = gpu.mig_devices[1]  # the 2g.35gb device
        backend.inject_xid(0, 79, gi=target.gi_id, ci=target.ci_id)
        expected = {m.uuid: "Unhealthy" if m is target else "Healthy" for m in gpu.mig_devices}
        await kubelet.wait_for(lambda: states() == expected)

        backend.inject_xid(0, 79)  # no instance named: every MIG device of the GPU
        await kubelet.wait_for(lambda: set(states().values()) == {"Unhealthy"})
        assert len(states()) == 4
