"""The one NVML seam: every pynvml call nvdp makes goes through `Nvml`.

`Nvml` wraps the module it is given: the real pynvml (`Nvml.real()`, imported only then, so
`import nvdp` never needs a driver) or a fake with the same names (`nvdp.testing.fake_nvml`).
This is the only code that names NVMLError, and it takes that class from the wrapped module, so a
fake's errors are translated exactly as pynvml's are.

A failed call becomes an nvdp error naming the call, raised `from` the NVMLError:
`DiscoveryError("<context>: <call>: <NVML's text>")`, or `DeviceError(gpu, ...)` when the call is
about one GPU; the event calls raise `EventWaitError`. Where a return code has a meaning of its
own (NOT_SUPPORTED, NOT_FOUND, TIMEOUT, GPU_IS_LOST...), call sites either ask for None on those
codes (`call_or_none`) or read the code back off the error (`code_name`, `failed_with`): none of
them catches a library error.
"""

from __future__ import annotations

import ctypes
from collections.abc import Collection
from typing import Any

from nvdp.errors import DeviceError, DiscoveryError, EventWaitError, NvmlUnavailable, PluginError

ERROR_PREFIX = "NVML_ERROR_"


def text(value: Any) -> str:
    """A string NVML returned: bytes from older pynvml versions, str from newer ones."""
    return value.decode() if isinstance(value, bytes) else str(value)


class Nvml:
    """pynvml (or a fake of it) behind nvdp's error types.

    Thread-safety: as pynvml's own (NVML calls may come from any thread); the seam keeps no
    state besides the code-name table it builds once.
    """

    def __init__(self, module: Any) -> None:
        self._module = module
        self._error: type[Exception] = module.NVMLError
        self._code_names: dict[int, str] | None = None

    @classmethod
    def real(cls) -> Nvml:
        """The installed pynvml (nvidia-ml-py)."""
        import pynvml

        return cls(pynvml)

    @property
    def module(self) -> Any:
        return self._module

    # --- constants and return codes ------------------------------------------------------------

    def constant(self, name: str, default: int | None = None) -> int:
        """A constant of the module (`NVML_FEATURE_ENABLED`, `nvmlEventTypeXidCriticalError`...);
        `default` where older bindings lack it."""
        value = getattr(self._module, name, default)
        if value is None:
            raise AttributeError(f"the NVML bindings have no {name}")
        return int(value)

    def optional_constant(self, name: str) -> int | None:
        """A constant, or None where the bindings are too old to have it."""
        value = getattr(self._module, name, None)
        return None if value is None else int(value)

    def code(self, name: str) -> int:
        """The value of a return code by name: `code("NOT_SUPPORTED")` is NVML_ERROR_NOT_SUPPORTED."""
        return int(getattr(self._module, ERROR_PREFIX + name))

    def code_name(self, exc: BaseException) -> str | None:
        """The NVML return code behind an error the seam raised (or behind an NVMLError), by name
        without the prefix: "NOT_SUPPORTED", "GPU_IS_LOST"... None when NVML did not cause it."""
        cause = exc if isinstance(exc, self._error) else exc.__cause__
        if not isinstance(cause, self._error):
            return None
        return self._name_of(cause)

    def failed_with(self, exc: BaseException, *names: str) -> bool:
        """Whether NVML answered `exc` with one of these return codes (by name)."""
        return self.code_name(exc) in names

    def reason(self, exc: BaseException) -> str:
        """NVML's own text for the failure behind `exc` ("GPU is lost"); else the error's text."""
        cause = exc if isinstance(exc, self._error) else exc.__cause__
        return str(cause if isinstance(cause, self._error) else exc)

    def _name_of(self, exc: Exception) -> str:
        if self._code_names is None:
            names: dict[int, str] = {}
            for attr in dir(self._module):
                value = getattr(self._module, attr) if attr.startswith(ERROR_PREFIX) else None
                if isinstance(value, int):
                    names.setdefault(value, attr.removeprefix(ERROR_PREFIX))
            self._code_names = names
        value = getattr(exc, "value", None)
        return self._code_names.get(value, str(value)) if isinstance(value, int) else str(value)

    # --- calls ---------------------------------------------------------------------------------

    def has(self, fn: str) -> bool:
        """Whether the bindings offer `fn` (older ones lack some calls)."""
        return callable(getattr(self._module, fn, None))

    def call(self, fn: str, *args: Any, gpu: str | None = None, context: str = "", **kwargs: Any) -> Any:
        """`module.fn(*args, **kwargs)`. An NVML failure raises `DeviceError(gpu, ...)` when `gpu`
        is given, else `DiscoveryError`; the message is "<context>: <fn>: <NVML's text>"."""
        try:
            return getattr(self._module, fn)(*args, **kwargs)
        except self._error as exc:
            raise self._translate(exc, fn, gpu, context) from exc

    def call_or_none(
        self, fn: str, *args: Any, none_on: Collection[str], gpu: str | None = None, context: str = "", **kwargs: Any
    ) -> Any:
        """As `call`, but None when NVML answers with one of the return codes in `none_on` (by
        name, e.g. ("NOT_FOUND", "INVALID_ARGUMENT")): an expected "no such thing"."""
        try:
            return getattr(self._module, fn)(*args, **kwargs)
        except self._error as exc:
            if self._name_of(exc) in none_on:
                return None
            raise self._translate(exc, fn, gpu, context) from exc

    def try_call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        """As `call`, but None on any NVML failure: for optional facts, whose absence (an older
        driver, a GPU without the feature) is never an error."""
        try:
            return getattr(self._module, fn)(*args, **kwargs)
        except self._error:
            return None

    def _translate(self, exc: Exception, fn: str, gpu: str | None, context: str) -> PluginError:
        what = f"{context}: {fn}" if context else fn
        if gpu is not None:
            return DeviceError(gpu, f"{what}: {exc}")
        return DiscoveryError(f"{what}: {exc}")

    def fabric_info(self, handle: Any) -> Any:
        """The GPU's fabric info: nvmlDeviceGetGpuFabricInfoV, or the older call where the driver
        lacks it, filled into the module's own structure (clusterUuid, status, cliqueId, state).
        None where the bindings, the driver or the GPU have none: the fact is optional."""
        for fn, struct in (("nvmlDeviceGetGpuFabricInfoV", "c_nvmlGpuFabricInfoV_t"),
                           ("nvmlDeviceGetGpuFabricInfo", "c_nvmlGpuFabricInfo_t")):
            make = getattr(self._module, struct, None)
            if make is None or not self.has(fn):
                continue
            info = make()
            # pynvml passes the pointer on to the C call; a fake fills the object it is given.
            pointer = ctypes.byref(info) if isinstance(info, ctypes.Structure) else info
            try:
                getattr(self._module, fn)(handle, pointer)
            except self._error as exc:
                if self._name_of(exc) == "FUNCTION_NOT_FOUND":
                    continue  # a driver older than this call: try the next one
                return None
            return info
        return None

    # --- library state -------------------------------------------------------------------------

    def init(self, library: str, searched: tuple[str, ...] = ()) -> None:
        """Load `library` (unless the module already holds a library handle) and initialise NVML.
        Raises `NvmlUnavailable` listing `searched` when either fails."""
        try:
            if self._module.nvmlLib is None:
                # pynvml loads the plain soname unless its library handle is already set.
                self._module.nvmlLib = ctypes.CDLL(library)
            self._module.nvmlInit()
        except (OSError, self._error) as exc:
            raise NvmlUnavailable(f"could not load or initialise NVML ({exc})", searched) from exc

    def shutdown(self) -> None:
        """nvmlShutdown; a failure there is of no use to anyone stopping, so it is ignored."""
        self.try_call("nvmlShutdown")

    # --- events --------------------------------------------------------------------------------

    def create_event_set(self) -> Any:
        try:
            return self._module.nvmlEventSetCreate()
        except self._error as exc:
            raise EventWaitError(f"nvmlEventSetCreate: {exc}") from exc

    def wait_event(self, event_set: Any, timeout_ms: int) -> Any:
        """The next event of the set (pynvml's `c_nvmlEventData_t`), or None when `timeout_ms`
        passed without one (TIMEOUT, the normal outcome of a quiet wait); other failures raise
        `EventWaitError`."""
        try:
            return self._module.nvmlEventSetWait_v2(event_set, timeout_ms)
        except self._error as exc:
            if self._name_of(exc) == "TIMEOUT":
                return None
            raise EventWaitError(f"nvmlEventSetWait: {exc}") from exc

    def free_event_set(self, event_set: Any) -> None:
        self.try_call("nvmlEventSetFree", event_set)
