"""The CUDA driver API as the daemon uses it (through `cuda-bindings`).

Every call returns its value or raises CudaError naming the call and the
driver's error. Contexts: the daemon uses each device's primary context (the
one CuPy and torch use), made current on whichever worker thread calls in.
The helpers the agent needs too (check, context, UUIDs, the slabs'
allocation properties) are torpor.cudadriver's, with the daemon's errors.

Importing this module needs neither cuda-bindings nor a GPU; calling it does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torpor.cudadriver import Driver

from torpord.errors import Unavailable

__all__ = [
    "CudaError",
    "allocation_prop",
    "check",
    "context",
    "cu",
    "device_ordinals",
    "granularity",
    "mem_info",
]


class CudaError(Unavailable):
    """A driver call failed (UNAVAILABLE: the device, not the request)."""

    def __init__(self, call: str, name: str) -> None:
        super().__init__(f"{call} failed: {name}", reason="CUDA_ERROR", metadata={"call": call})
        self.call = call
        self.name = name


def _unavailable(message: str) -> Unavailable:
    return Unavailable(message, reason="CUDA_UNAVAILABLE")


# The helpers shared with the agent (torpor.cudadriver), with the daemon's errors.
_driver = Driver(failed=CudaError, unavailable=_unavailable)
cu = _driver.module
check = _driver.check
init = _driver.init
context = _driver.context
uuid_of = _driver.uuid
allocation_prop = _driver.allocation_prop
granularity = _driver.granularity


def destroy_event(ordinal: int, event: Any) -> None:
    """Destroy an event of the device's primary context without taking the
    module's lock or changing this thread's current context (safe from a
    finaliser that runs inside another driver call)."""
    ctx = _driver.retained(ordinal)
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


def device_ordinals() -> dict[str, int]:
    """Each visible device's UUID to its CUDA ordinal in this process (which
    CUDA_VISIBLE_DEVICES may renumber: never name a device by ordinal)."""
    return {uuid_of(i): i for i in range(_driver.device_count())}


def mem_info(ordinal: int) -> tuple[int, int]:
    """(free, total) bytes on the device, as the driver sees them now."""
    context(ordinal)
    free, total = check(cu().cuMemGetInfo(), "cuMemGetInfo")
    return int(free), int(total)
