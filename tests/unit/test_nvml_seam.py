"""The one NVML seam (`backends.nvml.seam.Nvml`): NVML failures become nvdp errors naming the call,
and the NVMLError class is always the injected module's."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from nvdp.backends.nvml.library import nvml_loadable
from nvdp.backends.nvml.seam import Nvml
from nvdp.errors import DeviceError, DiscoveryError, EventWaitError, NvmlUnavailable
from nvdp.testing.fake_nvml import FakeGpu, FakeNvml

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "nvdp"


def fake() -> FakeNvml:
    nv = FakeNvml([FakeGpu("GPU-a", 0, "00000000:18:00.0"), FakeGpu("GPU-b", 1, "00000000:2A:00.0")])
    nv.nvmlInit()
    return nv


def test_an_injected_failure_is_a_discovery_error_naming_the_call() -> None:
    module = fake()
    module.fail("nvmlDeviceGetCount", "UNKNOWN")
    nv = Nvml(module)
    with pytest.raises(DiscoveryError) as caught:
        nv.call("nvmlDeviceGetCount")
    assert type(caught.value) is DiscoveryError
    assert str(caught.value) == "nvmlDeviceGetCount: Unknown Error"
    assert isinstance(caught.value.__cause__, FakeNvml.NVMLError)
    assert nv.code_name(caught.value) == "UNKNOWN" and nv.reason(caught.value) == "Unknown Error"


def test_a_call_about_one_gpu_is_a_device_error_with_its_context() -> None:
    module = fake()
    module.fail("nvmlDeviceGetName", "GPU_IS_LOST", gpu=1)
    nv = Nvml(module)
    assert nv.call("nvmlDeviceGetName", module.gpu(0), gpu="0") == "NVIDIA H200"
    with pytest.raises(DeviceError) as caught:
        nv.call("nvmlDeviceGetName", module.gpu(1), gpu="1", context="reading GPU facts")
    assert caught.value.gpu == "1"
    assert str(caught.value) == "GPU 1: reading GPU facts: nvmlDeviceGetName: GPU is lost"
    assert nv.failed_with(caught.value, "GPU_IS_LOST", "NOT_FOUND")
    assert not nv.failed_with(caught.value, "NOT_SUPPORTED")


@pytest.mark.parametrize(
    ("code", "answer"),
    [
        pytest.param("NOT_FOUND", None, id="a listed code: None"),
        pytest.param("INVALID_ARGUMENT", None, id="another listed code: None"),
        pytest.param("NO_PERMISSION", "raises", id="any other code: raises"),
    ],
)
def test_call_or_none(code: str, answer: str | None) -> None:
    module = fake()
    module.fail("nvmlDeviceGetHandleByIndex", code)
    nv = Nvml(module)

    def call() -> Any:
        return nv.call_or_none("nvmlDeviceGetHandleByIndex", 0, none_on=("NOT_FOUND", "INVALID_ARGUMENT"),
                               context="GPU 0")

    if answer is None:
        assert call() is None
    else:
        with pytest.raises(DiscoveryError, match=r"^GPU 0: nvmlDeviceGetHandleByIndex: Insufficient Permissions$"):
            call()


def test_try_call_swallows_nvml_failures_only() -> None:
    module = fake()
    nv = Nvml(module)
    module.fail("nvmlSystemGetCudaDriverVersion", "FUNCTION_NOT_FOUND")
    assert nv.try_call("nvmlSystemGetCudaDriverVersion") is None
    assert nv.try_call("nvmlSystemGetDriverVersion") == "580.159.04"
    with pytest.raises(TypeError):  # a bug of ours is no NVML answer
        nv.try_call("nvmlDeviceGetCount", "unexpected argument")


def test_the_injected_modules_error_class_is_used_not_pynvmls() -> None:
    assert not issubclass(FakeNvml.NVMLError, pynvml.NVMLError)

    def lost(*_: object) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    # A module whose NVMLError is the fake's: pynvml's own error is no NVML answer from it, so it
    # passes through untranslated (the seam does not import pynvml to catch it).
    mixed = SimpleNamespace(NVMLError=FakeNvml.NVMLError, nvmlDeviceGetCount=lost)
    with pytest.raises(pynvml.NVMLError):
        Nvml(mixed).call("nvmlDeviceGetCount")
    # The real bindings' class, given as the module's: translated, its codes named from the module.
    constants = {n: getattr(pynvml, n) for n in dir(pynvml) if n.startswith("NVML_ERROR_")}
    real_like = SimpleNamespace(NVMLError=pynvml.NVMLError, nvmlDeviceGetCount=lost, **constants)
    nv = Nvml(real_like)
    with pytest.raises(DiscoveryError, match=r"^nvmlDeviceGetCount: GPU is lost$") as caught:
        nv.call("nvmlDeviceGetCount")
    assert nv.code_name(caught.value) == "GPU_IS_LOST"


def test_the_real_module_is_pynvml() -> None:
    nv = Nvml.real()
    assert nv.module is pynvml
    assert nv.code("NOT_SUPPORTED") == pynvml.NVML_ERROR_NOT_SUPPORTED


def test_constants_and_codes_by_name() -> None:
    nv = Nvml(fake())
    assert nv.code("TIMEOUT") == 10 and nv.code("GPU_IS_LOST") == 15
    assert nv.constant("NVML_FEATURE_ENABLED") == 1
    assert nv.constant("NVML_NO_SUCH_THING", 18) == 18
    with pytest.raises(AttributeError, match="NVML_NO_SUCH_THING"):
        nv.constant("NVML_NO_SUCH_THING")
    assert nv.code_name(ValueError("not from NVML")) is None
    assert nv.reason(ValueError("not from NVML")) == "not from NVML"


def test_event_calls_raise_event_wait_errors() -> None:
    module = fake()
    nv = Nvml(module)
    event_set = nv.create_event_set()
    module.post(FakeNvml.NVML_ERROR_TIMEOUT, FakeNvml.NVML_ERROR_UNKNOWN)
    assert nv.wait_event(event_set, 5) is None
    with pytest.raises(EventWaitError, match=r"^nvmlEventSetWait: Unknown Error$"):
        nv.wait_event(event_set, 5)
    nv.free_event_set(event_set)
    nv.free_event_set(event_set)  # INVALID_ARGUMENT the second time: ignored
    module.fail("nvmlEventSetCreate", "MEMORY")
    with pytest.raises(EventWaitError, match=r"^nvmlEventSetCreate: Insufficient Memory$"):
        nv.create_event_set()


def test_a_library_that_cannot_be_loaded_is_nvml_unavailable(tmp_path: Path) -> None:
    module = fake()
    module.nvmlLib = None  # not loaded yet: the seam opens the library it is given
    missing = str(tmp_path / "libnvidia-ml.so.1")
    with pytest.raises(NvmlUnavailable) as caught:
        Nvml(module).init(missing, searched=(missing, "libnvidia-ml.so.1"))
    assert caught.value.searched == (missing, "libnvidia-ml.so.1")
    assert missing in str(caught.value) and isinstance(caught.value.__cause__, OSError)


def test_nvml_loadable_goes_through_the_seam() -> None:
    module = FakeNvml([])
    assert nvml_loadable(Nvml(module)) is True
    assert [c.name for c in module.calls] == ["nvmlInit", "nvmlShutdown"] and module.initialised == 0
    module.fail("nvmlInit", "DRIVER_NOT_LOADED")
    assert nvml_loadable(Nvml(module)) is False


def _names_nvml_error(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id == "NVMLError":
            return True
        if isinstance(node, ast.Attribute) and node.attr == "NVMLError":
            return True
        if isinstance(node, ast.ClassDef | ast.alias) and getattr(node, "name", "") == "NVMLError":
            return True
    return False


def test_only_the_seam_names_nvml_error() -> None:
    """Call sites ask the seam about return codes; none of them catches a library error."""
    naming = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if _names_nvml_error(p))
    assert naming == ["backends/nvml/seam.py", "testing/fake_nvml.py"]  # the fake defines its own
