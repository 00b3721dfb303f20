"""The measurement behind the transfer-method choice (methods.py), taken
once per device on the GPU."""

from __future__ import annotations

from typing import Any

import structlog

from torpord.backends.cuda.device import Device
from torpord.backends.cuda.methods import MEASURED_SIZES, fastest
from torpord.backends.cuda.staging import PinnedStaging, address_of
from torpord.cuda import driver
from torpord.cuda.driver import check, cu

__all__ = ["CALIBRATION_BYTES", "measure"]

log = structlog.get_logger("torpord.cuda")

CALIBRATION_BYTES = 4 << 20


def measure(dev: Device, kernels: Any, staging: PinnedStaging) -> list[tuple[int, str]]:
    """Time, once per device, the three ways a chunk's pieces reach device
    memory from pinned staging: one copy each, the gather/scatter kernel,
    and cuMemcpyBatchAsync (where the driver has it), for pieces of 4 KiB
    to 256 KiB (half of them 8-byte but not 16-byte aligned, as safetensors
    offsets often are), on a stream of its own. The fastest at each size."""
    import cupy

    from torpord.cuda.kernels import best_seconds

    buffer = staging.take(CALIBRATION_BYTES)
    host = address_of(buffer)
    where = staging.holding(host, CALIBRATION_BYTES)
    assert where is not None
    _, device = where
    d = cu()
    methods: list[tuple[int, str]] = []
    seen: dict[str, dict[str, float]] = {}
    batch_error = ""
    try:
        with cupy.cuda.Device(dev.ordinal):
            target = cupy.empty(CALIBRATION_BYTES, dtype=cupy.uint8)
            stream = cupy.cuda.Stream(non_blocking=True)
            for size in MEASURED_SIZES:
                count = min(256, (CALIBRATION_BYTES - 16) // size)
                segments = [(i * size + 8 * (i % 2), i * size, size) for i in range(count)]

                def copies(segments: list[tuple[int, int, int]] = segments) -> None:
                    for s_off, d_off, n in segments:
                        check(
                            d.cuMemcpyHtoDAsync(
                                target.data.ptr + d_off, host + s_off, n, stream.ptr
                            ),
                            "cuMemcpyHtoDAsync",
                        )

                def kernel(segments: list[tuple[int, int, int]] = segments) -> None:
                    kernels.gather_scatter(device, target.data.ptr, segments, stream=stream)

                def batch(segments: list[tuple[int, int, int]] = segments) -> None:
                    driver.memcpy_batch(
                        [target.data.ptr + d_off for _, d_off, _ in segments],
                        [host + s_off for s_off, _, _ in segments],
                        [n for _, _, n in segments],
                        stream.ptr,
                    )

                times = {"copies": best_seconds(stream, copies)}
                times["kernel"] = best_seconds(stream, kernel)
                if not batch_error:
                    try:
                        times["batch"] = best_seconds(stream, batch)
                    except Exception as err:  # an older driver or bindings
                        batch_error = str(err)
                seen[f"{count}x{size >> 10}KiB"] = {m: round(t * 1e6) for m, t in times.items()}
                methods.append((size, fastest(times)))
    finally:
        staging.give(buffer)
    log.info(
        "transfer methods measured (microseconds per chunk); the fastest is used",
        device=dev.uuid,
        chosen={f"{size >> 10}KiB": method for size, method in methods},
        runs=seen,
        batch_unavailable=batch_error or None,
    )
    return methods
