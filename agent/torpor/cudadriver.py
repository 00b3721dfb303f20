"""The CUDA driver API (cuda-bindings) as the daemon and the agent both use it.

`Driver` holds one side's errors: every call returns its value or raises
that side's error naming the call and the driver's error name (the daemon's
CudaError, the agent's MappingError). What is a process's, not a side's, is
kept once here: whether the driver is initialised and each device's primary
context (the one CuPy and torch use), made current on whichever thread calls.

The slabs are VMM allocations: pinned device memory, exportable as a POSIX
fd (`allocation_prop`); the daemon creates them, the agent maps them, and
both pad to the same granularity.

Importing this module needs neither cuda-bindings nor a GPU; calling it does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["INSTALL", "Driver", "uuid_string"]

INSTALL = "install torpor[cuda12] or torpor[cuda13]"

_lock = threading.Lock()
_contexts: dict[int, Any] = {}  # ordinal -> its retained primary context
_initialised = False


def uuid_string(raw: bytes) -> str:
    """`GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as NVML and nvidia-smi print
    a device's 16-byte UUID."""
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class Driver:
    """The driver API with one side's errors: `failed(call, error_name)` for a
    call that failed, `unavailable(message)` for no cuda-bindings or no driver."""

    def __init__(
        self,
        *,
        failed: Callable[[str, str], Exception],
        unavailable: Callable[[str], Exception],
    ) -> None:
        self.failed = failed
        self.unavailable = unavailable

    def module(self) -> Any:
        """The `cuda.bindings.driver` module."""
        try:
            from cuda.bindings import driver
        except ImportError as err:
            raise self.unavailable(f"cuda-bindings is not installed: {INSTALL}") from err
        return driver

    def check(self, result: Any, call: str) -> Any:
        """cuda-bindings returns (CUresult, value...): the value, or the error."""
        driver = self.module()
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != driver.CUresult.CUDA_SUCCESS:
            name_err, name = driver.cuGetErrorName(err)
            raise self.failed(call, name.decode() if name_err == 0 and name else str(err))
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)

    def init(self) -> None:
        """cuInit, once per process."""
        global _initialised
        with _lock:
            if not _initialised:
                try:
                    result = self.module().cuInit(0)
                except RuntimeError as err:  # cuda-bindings could not load libcuda
                    raise self.unavailable(f"no NVIDIA driver: {err}") from err
                self.check(result, "cuInit")
                _initialised = True

    def context(self, ordinal: int) -> None:
        """Make the device's primary context current on this thread."""
        driver = self.module()
        self.init()
        with _lock:
            ctx = _contexts.get(ordinal)
            if ctx is None:
                dev = self.check(driver.cuDeviceGet(ordinal), "cuDeviceGet")
                ctx = self.check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
                _contexts[ordinal] = ctx
        self.check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    def retained(self, ordinal: int) -> Any:
        """The device's primary context if this process retained it, else
        None; takes no lock (safe from a finaliser inside a driver call)."""
        return _contexts.get(ordinal)

    def uuid(self, ordinal: int) -> str:
        """The UUID of the device with this ordinal (see uuid_string)."""
        driver = self.module()
        self.init()
        dev = self.check(driver.cuDeviceGet(ordinal), "cuDeviceGet")
        return uuid_string(bytes(self.check(driver.cuDeviceGetUuid(dev), "cuDeviceGetUuid").bytes))

    def device_count(self) -> int:
        self.init()
        return int(self.check(self.module().cuDeviceGetCount(), "cuDeviceGetCount"))

    def allocation_prop(self, ordinal: int) -> Any:
        """The properties of a slab's allocation on the device: pinned device
        memory, exportable as a POSIX fd."""
        d = self.module()
        prop = d.CUmemAllocationProp()
        prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = ordinal
        prop.requestedHandleTypes = (
            d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        )
        return prop

    def granularity(self, ordinal: int) -> int:
        """The size every slab on the device is padded to (its allocations'
        minimum granularity): the daemon allocates and the agent maps that much."""
        d = self.module()
        return int(
            self.check(
                d.cuMemGetAllocationGranularity(
                    self.allocation_prop(ordinal),
                    d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM,
                ),
                "cuMemGetAllocationGranularity",
            )
        )
