"""The CUDA driver API as the daemon uses it (through `cuda-bindings`).

Every call returns its value or raises CudaError naming the call and the
driver's error. Contexts: the daemon uses each device's primary context (the
one CuPy and torch use), made current on whichever worker thread calls in.

Importing this module needs neither cuda-bindings nor a GPU; calling it does.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from torpord.errors import Unavailable

__all__ = ["CudaError", "check", "context", "cu", "device_ordinals", "mem_info"]

_lock = threading.Lock()
_contexts: dict[int, Any] = {}
_initialised = False


class CudaError(Unavailable):
    """A driver call failed (UNAVAILABLE: the device, not the request)."""

    def __init__(self, call: str, name: str) -> None:
        super().__init__(f"{call} failed: {name}", reason="CUDA_ERROR", metadata={"call": call})
        self.call = call
        self.name = name


def cu() -> Any:
    """The `cuda.bindings.driver` module."""
    try:
        from cuda.bindings import driver
    except ImportError as err:
        raise Unavailable(
            "the cuda backend needs cuda-bindings: install torpor[cuda12] or torpor[cuda13]",
            reason="CUDA_UNAVAILABLE",
        ) from err
    return driver


def check(result: Any, call: str) -> Any:
    """cuda-bindings returns (CUresult, value...): the value, or CudaError."""
    driver = cu()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        name_err, name = driver.cuGetErrorName(err)
        raise CudaError(call, name.decode() if name_err == 0 and name else str(err))
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def init() -> None:
    global _initialised
    with _lock:
        if not _initialised:
            try:
                result = cu().cuInit(0)
            except RuntimeError as err:  # cuda-bindings could not load libcuda
                raise Unavailable(f"no NVIDIA driver: {err}", reason="CUDA_UNAVAILABLE") from err
            check(result, "cuInit")
            _initialised = True


def context(ordinal: int) -> None:
    """Make the device's primary context current on this thread."""
    driver = cu()
    init()
    with _lock:
        ctx = _contexts.get(ordinal)
        if ctx is None:
            dev = check(driver.cuDeviceGet(ordinal), "cuDeviceGet")
            ctx = check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            _contexts[ordinal] = ctx
    check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def destroy_event(ordinal: int, event: Any) -> None:
    """Destroy an event of the device's primary context without taking the
    module's lock or changing this thread's current context (safe from a
    finaliser that runs inside another driver call)."""
    ctx = _contexts.get(ordinal)
    if ctx is None:
        return
    driver = cu()
    check(driver.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")
    try:
        check(driver.cuEventDestroy(event), "cuEventDestroy")
    finally:
        driver.cuCtxPopCurrent()


def memcpy_batch(
    dsts: Sequence[int], srcs: Sequence[int], sizes: Sequence[int], stream: Any
) -> None:
    """cuMemcpyBatchAsync (CUDA >= 12.8): every copy queued on `stream` in one
    call, each reading its source in stream order."""
    driver = cu()
    attrs = driver.CUmemcpyAttributes()
    attrs.srcAccessOrder = driver.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
    check(
        driver.cuMemcpyBatchAsync(
            [driver.CUdeviceptr(a) for a in dsts],
            [driver.CUdeviceptr(a) for a in srcs],
            list(sizes),
            len(sizes),
            [attrs],
            [0],
            1,
            stream,
        ),
        "cuMemcpyBatchAsync",
    )


def uuid_of(ordinal: int) -> str:
    """`GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as NVML and nvidia-smi print it."""
    driver = cu()
    init()
    dev = check(driver.cuDeviceGet(ordinal), "cuDeviceGet")
    raw = bytes(check(driver.cuDeviceGetUuid(dev), "cuDeviceGetUuid").bytes)
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def device_ordinals() -> dict[str, int]:
    """Each visible device's UUID to its CUDA ordinal in this process (which
    CUDA_VISIBLE_DEVICES may renumber: never name a device by ordinal)."""
    init()
    count = check(cu().cuDeviceGetCount(), "cuDeviceGetCount")
    return {uuid_of(i): i for i in range(count)}


def mem_info(ordinal: int) -> tuple[int, int]:
    """(free, total) bytes on the device, as the driver sees them now."""
    context(ordinal)
    free, total = check(cu().cuMemGetInfo(), "cuMemGetInfo")
    return int(free), int(total)
