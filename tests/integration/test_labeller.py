"""GPU feature discovery's run loop (app.labeller) on simulated nodes: oneshot, the sleep interval,
infinite, reload, stop, the file removed on exit, init failures, the NodeFeature output."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nvdp.app.labeller import NO_LABELS, Labeller
from nvdp.backends.base import GpuBackend
from nvdp.config.load import load
from nvdp.config.options import GFD_OPTIONS, Config
from nvdp.core.devices import Node
from nvdp.errors import ConfigError, DiscoveryError, LabelError, NvmlUnavailable
from nvdp.testing import eventually, stays_true
from nvdp.testing.fake_objects import FakeObjects, daemonset_pod
from tests.label_rules import NONE, check, lines_to_labels

P = "nvidia.com/"


def gfd_config(tmp_path: Path, profile: str = "dgx-h100", **cli: Any) -> Config:
    values: dict[str, Any] = {"simulate": profile, "use_node_feature_api": "false",
                              "output_file": str(tmp_path / "features.d" / "gfd"),
                              "machine_type_file": str(tmp_path / "product_name")}
    values.update(cli)
    (tmp_path / "product_name").write_text("DGX H100\n")
    return load(values, {}, options=GFD_OPTIONS)


def clock() -> Callable[[], float]:
    ticks = itertools.count(1700000000)
    return lambda: float(next(ticks))


def feature_file(cfg: Config) -> Path:
    return Path(cfg.output_file)


async def test_oneshot_writes_the_file_and_leaves_it(tmp_path: Path) -> None:
    cfg = gfd_config(tmp_path, oneshot="true")
    labeller = Labeller(cfg, clock=clock())
    await asyncio.wait_for(labeller.run(), 10)
    labels = lines_to_labels(feature_file(cfg).read_text())
    assert check(labels, NONE) == []
    assert labels[f"{P}gfd.timestamp"] == "1700000000"
    assert labels[f"{P}gpu.machine"] == "DGX-H100"
    assert labeller.runs == 1


async def test_the_loop_relabels_each_interval_and_removes_the_file_on_stop(tmp_path: Path) -> None:
    cfg = gfd_config(tmp_path, sleep_interval="20ms")
    labeller = Labeller(cfg, clock=clock())
    task = asyncio.create_task(labeller.run())
    await eventually(lambda: labeller.runs >= 3, "three labelling runs")
    assert feature_file(cfg).exists()
    # the timestamp is taken once per start, not per run
    assert lines_to_labels(feature_file(cfg).read_text())[f"{P}gfd.timestamp"] == "1700000000"
    labeller.stop()
    await asyncio.wait_for(task, 10)
    assert not feature_file(cfg).exists()
    assert list(feature_file(cfg).parent.iterdir()) == []  # no temporary files either


async def test_infinite_labels_once_and_keeps_the_file(tmp_path: Path) -> None:
    cfg = gfd_config(tmp_path, sleep_interval="infinite")
    labeller = Labeller(cfg)
    task = asyncio.create_task(labeller.run())
    await eventually(lambda: labeller.runs == 1, "the first run")
    await stays_true(lambda: labeller.runs == 1, 0.3, "no second run")
    labeller.stop()
    await asyncio.wait_for(task, 10)
    assert feature_file(cfg).exists()  # as upstream: only a repeating labeller takes its file back


async def test_sighup_reloads_config_backend_and_timestamp(tmp_path: Path) -> None:
    first = gfd_config(tmp_path, "a100-mig-mixed", sleep_interval="infinite")
    configs = [gfd_config(tmp_path, "a100-mig-mixed", sleep_interval="infinite", mig_strategy="mixed")]
    opened: list[str] = []

    def backend_factory(cfg: Config) -> GpuBackend:
        from nvdp.app.discovery import open_backend

        opened.append(cfg.mig_strategy)
        return open_backend(cfg)

    labeller = Labeller(first, reload_config=configs.pop, backend_factory=backend_factory, clock=clock())
    task = asyncio.create_task(labeller.run())
    await eventually(lambda: labeller.runs == 1, "the first run")
    assert f"{P}mig.strategy" not in labeller.labels
    labeller.request_reload()
    labeller.request_reload()  # a burst of SIGHUPs is one reload
    await eventually(lambda: labeller.runs == 2, "a run after the reload")
    assert labeller.labels[f"{P}mig.strategy"] == "mixed"
    assert labeller.labels[f"{P}mig-1g.5gb.count"] == "24"
    assert labeller.labels[f"{P}gfd.timestamp"] == "1700000001"
    assert opened == ["none", "mixed"]  # the old backend closed, a new one opened
    await stays_true(lambda: labeller.runs == 2, 0.2, "the second SIGHUP of the burst does nothing more")
    labeller.stop()
    await asyncio.wait_for(task, 10)


async def test_a_bad_config_on_sighup_keeps_the_running_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = gfd_config(tmp_path, sleep_interval="infinite")

    def bad() -> Config:
        raise ConfigError("--mig-strategy", "invalid strategy: 'dual'")

    labeller = Labeller(cfg, reload_config=bad)
    task = asyncio.create_task(labeller.run())
    await eventually(lambda: labeller.runs == 1, "the first run")
    with caplog.at_level(logging.ERROR, "nvdp.gfd"):
        labeller.request_reload()
        await eventually(lambda: labeller.runs == 2, "labelling with the running config")
    assert "keeping the running config" in caplog.text
    assert labeller.cfg is cfg
    labeller.stop()
    await asyncio.wait_for(task, 10)


def broken_backend(cfg: Config) -> GpuBackend:
    raise NvmlUnavailable("could not load or initialise NVML (libnvidia-ml.so.1: cannot open)", ("libnvidia-ml.so.1",))


async def test_no_nvml_and_fail_on_init_error_false_gives_no_gpu_labels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = gfd_config(tmp_path, oneshot="true", fail_on_init_error="false")
    with caplog.at_level(logging.WARNING, "nvdp.gfd"):
        await asyncio.wait_for(Labeller(cfg, backend_factory=broken_backend, clock=clock()).run(), 10)
    assert feature_file(cfg).read_text() == f"{P}gfd.timestamp=1700000000\n"
    assert NO_LABELS in caplog.text
    assert "no GPU labels" in caplog.text


async def test_no_nvml_and_fail_on_init_error_true_stops(tmp_path: Path) -> None:
    cfg = gfd_config(tmp_path, oneshot="true")
    with pytest.raises(NvmlUnavailable):
        await Labeller(cfg, backend_factory=broken_backend).run()
    assert not feature_file(cfg).exists()


class FailingLater:
    name = "flaky"

    def __init__(self) -> None:
        from nvdp.backends.simulated.expand import build_node
        from nvdp.backends.simulated.profile import load_profile

        self.node = build_node(*load_profile("h200"))
        self.calls = 0
        self.closed = False

    def discover(self) -> Node:
        self.calls += 1
        if self.calls > 1:
            raise DiscoveryError("nvmlDeviceGetCount: GPU is lost")
        return self.node

    def close(self) -> None:
        self.closed = True


async def test_a_failing_discovery_stops_and_takes_the_file_back(tmp_path: Path) -> None:
    cfg = gfd_config(tmp_path, sleep_interval="10ms")
    backend = FailingLater()
    labeller = Labeller(cfg, backend_factory=lambda _: backend)
    with pytest.raises(DiscoveryError, match="GPU is lost"):
        await asyncio.wait_for(labeller.run(), 10)
    assert labeller.runs == 1 and backend.closed
    assert not feature_file(cfg).exists()


async def test_a_node_upstream_cannot_label_is_an_error(tmp_path: Path) -> None:
    """The pure function's LabelError stops GFD (exit 1 in the CLI), here a driver version that is
    not X.Y[.Z] (the MPS-with-MIG case is the same path: tests/unit/test_labels.py)."""
    profile = tmp_path / "odd.yaml"
    profile.write_text("driver_version: '580'\ngpus:\n  - name: NVIDIA L40S\n")
    cfg = gfd_config(tmp_path, str(profile), oneshot="true")
    with pytest.raises(LabelError, match="does not match format"):
        await Labeller(cfg).run()


async def test_warnings_are_logged_once_while_they_last(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = gfd_config(tmp_path, "h200-mig", sleep_interval="10ms", mig_strategy="single",
                     machine_type_file=str(tmp_path / "missing"))
    labeller = Labeller(cfg)
    with caplog.at_level(logging.WARNING, "nvdp.gfd"):
        task = asyncio.create_task(labeller.run())
        await eventually(lambda: labeller.runs >= 3, "three runs")
        labeller.stop()
        await asyncio.wait_for(task, 10)
    assert caplog.text.count("Invalid configuration detected for mig-strategy=single") == 1
    assert caplog.text.count("Error getting machine type from") == 1
    assert labeller.labels[f"{P}gpu.machine"] == "unknown"


async def test_stdout_output(tmp_path: Path) -> None:
    cfg = gfd_config(tmp_path, oneshot="true", no_timestamp="true", output_file="-")
    out = io.StringIO()
    await Labeller(cfg, stdout=out).run()
    assert check(lines_to_labels(out.getvalue()), NONE) == []


async def test_node_feature_output_sends_nothing_when_nothing_changed(tmp_path: Path) -> None:
    cfg = gfd_config(tmp_path, sleep_interval="10ms", use_node_feature_api="true", node_name="node-1",
                     namespace="gpu-operator", pod_name="gfd-x1")
    api = FakeObjects()
    api.add_pod("gpu-operator", daemonset_pod("gfd-x1", "ndp-gpu-feature-discovery"))
    labeller = Labeller(cfg, client_factory=lambda _: api, clock=clock())
    task = asyncio.create_task(labeller.run())
    await eventually(lambda: labeller.runs >= 3, "three runs")
    labeller.stop()
    await asyncio.wait_for(task, 10)
    assert api.writes() == [("create", "nvidia-features-for-node-1")]  # the same labels each run
    (obj,) = api.objects.values()
    assert obj["spec"]["labels"] == labeller.labels
    assert not feature_file(cfg).exists()  # no file in API mode


async def test_node_feature_api_without_a_client_fails_before_discovery(tmp_path: Path) -> None:
    cfg = gfd_config(tmp_path, oneshot="true", use_node_feature_api="true", node_name="node-1")
    opened: list[Config] = []

    def factory(c: Config) -> GpuBackend:
        opened.append(c)
        return broken_backend(c)

    with pytest.raises(ConfigError, match="no Kubernetes API client was given"):
        await Labeller(cfg, backend_factory=factory).run()
    assert opened == []
