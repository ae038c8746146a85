"""`gpu-feature-discovery` (and `nvdp labels`) as operators run it: subprocesses of the console
scripts, real signals, exit codes, the feature file end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nvdp.backends.nvml.library import nvml_loadable
from nvdp.backends.simulated.profile import builtin_profiles
from nvdp.testing import eventually_sync
from tests.label_rules import MIXED, NONE, check, lines_to_labels

BIN = Path(sys.executable).parent
P = "nvidia.com/"
STDOUT_ARGS = ("--oneshot", "--no-timestamp", "--output-file", "-", "--use-node-feature-api=false")


def clean_env(**extra: str) -> dict[str, str]:
    prefixes = ("NVDP_", "GFD_", "MIG_", "DEVICE_", "FAIL_ON", "USE_NODE", "CONFIG_FILE", "NODE_NAME", "NAMESPACE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


GFD = ("gpu-feature-discovery",)
SHARED_GPU = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n      - {{name: nvidia.com/gpu, replicas: {}}}\n"


def gfd(*args: str, command: tuple[str, ...] = GFD, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / command[0]), *command[1:], *args], env=clean_env(**env),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("profile", builtin_profiles())
def test_prints_the_full_label_set_of_every_builtin_profile(profile: str) -> None:
    result = gfd(*STDOUT_ARGS, "--simulate", profile)
    assert result.returncode == 0, result.stderr
    labels = lines_to_labels(result.stdout)
    assert check(labels, NONE) == []
    assert f"{P}gfd.timestamp" not in labels
    assert result.stdout == "".join(f"{k}={labels[k]}\n" for k in sorted(labels))  # sorted lines
    assert "Traceback" not in result.stderr


def test_nvdp_labels_is_the_same_command() -> None:
    a = gfd(*STDOUT_ARGS, "--simulate", "a100-mig-mixed", "--mig-strategy", "mixed")
    b = gfd(*STDOUT_ARGS, "--simulate", "a100-mig-mixed", "--mig-strategy", "mixed", command=("nvdp", "labels"))
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout
    assert check(lines_to_labels(a.stdout), MIXED) == []


def test_gfd_env_names_win_over_the_plugins() -> None:
    result = gfd("--simulate", "a100-mig-mixed", GFD_MIG_STRATEGY="mixed", MIG_STRATEGY="single",
                 GFD_ONESHOT="true", GFD_NO_TIMESTAMP="true", GFD_OUTPUT_FILE="", USE_NODE_FEATURE_API="false")
    assert result.returncode == 0, result.stderr
    assert lines_to_labels(result.stdout)[f"{P}mig.strategy"] == "mixed"


def test_the_feature_file_end_to_end(tmp_path: Path) -> None:
    """Written atomically and kept fresh while running; SIGHUP reloads; SIGTERM exits 0 and
    removes the file (upstream's clean-up)."""
    out = tmp_path / "features.d" / "gfd"
    log = tmp_path / "gfd.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [str(BIN / "gpu-feature-discovery"), "--use-node-feature-api=false", "--output-file", str(out),
             "--sleep-interval", "50ms", "--simulate", "dgx-h100", "--machine-type-file", "/nonexistent"],
            env=clean_env(), stdout=sink, stderr=subprocess.STDOUT, text=True,
        )
        try:
            eventually_sync(out.exists, "the feature file", timeout_s=30)
            labels = lines_to_labels(out.read_text())
            assert check(labels, NONE) == []
            assert labels[f"{P}gpu.machine"] == "unknown"
            assert (out.stat().st_mode & 0o777) == 0o644
            eventually_sync(lambda: log.read_text().count("Writing labels to output file") >= 2, "a second run")
            proc.send_signal(signal.SIGHUP)
            eventually_sync(lambda: "reloaded on SIGHUP" in log.read_text(), "the reload")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not out.exists()
    assert list(out.parent.iterdir()) == []
    assert "Traceback" not in log.read_text()


def test_oneshot_leaves_the_file(tmp_path: Path) -> None:
    out = tmp_path / "gfd"
    result = gfd("--oneshot", "--use-node-feature-api=false", "-o", str(out), "--simulate", "h200")
    assert result.returncode == 0, result.stderr
    assert check(lines_to_labels(out.read_text()), NONE) == []
    assert result.stdout == ""


def test_node_feature_api_without_api_settings_stops_clearly() -> None:
    # the default: the NodeFeature API (tests/integration/test_kube_wiring.py runs it on the fake API server)
    result = gfd("--oneshot", "--simulate", "h200", NODE_NAME="node-1", KUBECONFIG="", KUBERNETES_SERVICE_HOST="")
    assert result.returncode == 2
    assert "KUBERNETES_SERVICE_HOST" in result.stderr and "Traceback" not in result.stderr
    assert "--use-node-feature-api=false" in result.stderr  # the way to the file mode
    result = gfd("--oneshot", "--simulate", "h200")
    assert result.returncode == 2 and "required flag node-name not set" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("--sleep-interval", "5x"), "--sleep-interval"),
    (("--mig-strategy", "dual"), "--mig-strategy"),
    (("--oneshot=maybe",), "--oneshot"),
])
def test_bad_flags_exit_2(args: tuple[str, ...], message: str) -> None:
    result = gfd(*args, "--simulate", "h200", "--use-node-feature-api=false")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_config_file_with_one_replica_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(SHARED_GPU.format(1))
    result = gfd(*STDOUT_ARGS, "--simulate", "h200", "--config-file", str(config))
    assert result.returncode == 2
    assert "replicas must be >= 2" in result.stderr and "Traceback" not in result.stderr


def test_time_slicing_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(SHARED_GPU.format(4))
    result = gfd(*STDOUT_ARGS, "--simulate", "dgx-h100", GFD_CONFIG_FILE=str(config))
    assert result.returncode == 0, result.stderr
    labels = lines_to_labels(result.stdout)
    assert (labels[f"{P}gpu.replicas"], labels[f"{P}gpu.sharing-strategy"]) == ("4", "time-slicing")
    assert labels[f"{P}gpu.product"] == "NVIDIA-H100-80GB-HBM3-SHARED"


MPS_GPU = "version: v1\nsharing:\n  mps:\n    resources:\n      - {{name: nvidia.com/gpu, replicas: {}}}\n"


def test_mps_from_the_config_file(tmp_path: Path) -> None:
    """What the chart's MPS DaemonSet selects on (nvidia.com/mps.capable=true), from the same file
    the plugin reads; GFD takes no --mps-root."""
    config = tmp_path / "config.yaml"
    config.write_text(MPS_GPU.format(4))
    result = gfd(*STDOUT_ARGS, "--simulate", "dgx-h100", "--config-file", str(config))
    assert result.returncode == 0, result.stderr
    labels = lines_to_labels(result.stdout)
    assert labels[f"{P}mps.capable"] == "true"
    assert (labels[f"{P}gpu.replicas"], labels[f"{P}gpu.sharing-strategy"]) == ("4", "mps")
    assert labels[f"{P}gpu.product"] == "NVIDIA-H100-80GB-HBM3-SHARED"
    assert check(labels, NONE) == []


def test_mps_on_a_node_with_a_mig_enabled_gpu_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(MPS_GPU.format(4))
    result = gfd(*STDOUT_ARGS, "--simulate", "h200-mig", "--config-file", str(config))
    assert result.returncode == 1, result.stderr
    assert "MPS sharing is not supported on MIG-enabled devices" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_mps_with_one_replica_exits_2_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(MPS_GPU.format(1))
    result = gfd(*STDOUT_ARGS, "--simulate", "dgx-h100", "--config-file", str(config))
    assert result.returncode == 2, result.stderr
    assert "sharing.mps.resources.0.replicas" in result.stderr and "must be >= 2" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_a_node_it_cannot_label_exits_1(tmp_path: Path) -> None:
    profile = tmp_path / "odd.yaml"
    profile.write_text("driver_version: '580'\ngpus:\n  - name: NVIDIA L40S\n")
    result = gfd(*STDOUT_ARGS, "--simulate", str(profile))
    assert result.returncode == 1
    assert "labelling failed" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(nvml_loadable(), reason="NVML is present on this machine")
def test_without_nvml_and_fail_on_init_error_false_no_gpu_labels_no_crash() -> None:
    result = gfd("--oneshot", "--output-file", "-", "--use-node-feature-api=false", "--fail-on-init-error=false")
    assert result.returncode == 0, result.stderr
    labels = lines_to_labels(result.stdout)
    assert list(labels) == [f"{P}gfd.timestamp"]
    assert "No labels generated from any source" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(nvml_loadable(), reason="NVML is present on this machine")
def test_without_nvml_it_exits_1() -> None:
    result = gfd(*STDOUT_ARGS)
    assert result.returncode == 1
    assert "initialisation failed" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
