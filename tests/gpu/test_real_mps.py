"""The real `nvidia-cuda-mps-control` with nvdp's MPS code, on a GPU node (`make gpu-test`).

It starts a control daemon in a temporary pipe folder, tells it the settings nvdp computes for
the node's first GPU, checks that the daemon reports them and that nvdp's readiness check sees
it, then quits it. The GPU's compute mode is never changed (nvidia-smi is not run): a daemon
without EXCLUSIVE_PROCESS still answers its control pipe, which is all that is checked here.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdp.backends.mps import MpsControl
from nvdp.backends.nvml.discovery import NvmlBackend
from nvdp.core import mps
from nvdp.core.mps import MpsDaemon, MpsGpu

pytestmark = pytest.mark.gpu
RESOURCE = "nvidia.com/gpu"


@pytest.fixture
def root() -> Iterator[Path]:
    if shutil.which("nvidia-cuda-mps-control") is None:
        pytest.skip("nvidia-cuda-mps-control is not on PATH")
    folder = Path(tempfile.mkdtemp(prefix="nvdp-mps-", dir="/tmp"))  # short: the pipe is a unix socket path
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


async def test_the_real_control_daemon_takes_nvdps_settings(root: Path) -> None:
    backend = NvmlBackend()
    try:
        gpu = backend.discover().gpus[0]
    finally:
        backend.close()
    daemon = MpsDaemon(RESOURCE, 4, (MpsGpu(gpu.uuid, str(gpu.index), gpu.memory_bytes),))
    control = MpsControl("nvidia-cuda-mps-control", str(root))
    for folder in (mps.pipe_dir(str(root), RESOURCE), mps.log_dir(str(root), RESOURCE)):
        Path(folder).mkdir(parents=True)
    assert await control.probe(RESOURCE) is not None  # no daemon yet: the check fails
    await control.start_daemon(RESOURCE)
    try:
        await control.ask(RESOURCE, daemon.settings())
        assert await control.probe(RESOURCE) is None
        answer = await control.ask(RESOURCE, [mps.READINESS_COMMAND])
        assert float(answer.split()[-1]) == 25.0
        limit = await control.ask(RESOURCE, [f"get_default_device_pinned_mem_limit {gpu.index}"])
        assert str(gpu.memory_bytes // 4 // mps.MIB) in limit  # the real one's unit format is not pinned here
    finally:
        await control.ask(RESOURCE, [mps.QUIT_COMMAND])
    assert (Path(mps.log_dir(str(root), RESOURCE)) / "control.log").stat().st_size > 0  # it logs where told
