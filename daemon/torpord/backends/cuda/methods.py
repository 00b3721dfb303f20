"""How a chunk's many small pieces reach a device slab from pinned staging.

Three ways: one copy each ("copies"), one launch of the gather/scatter
kernel ("kernel"), or one call of the driver's batched copy,
cuMemcpyBatchAsync, CUDA >= 12.8 ("batch"). Which is fastest depends on the
GPU, the link and the piece size, so it is measured on each device at first
use (torpord.backends.cuda.calibration) and chosen by the chunk's mean piece
size (`choose_method`, a pure function of the measurement); fewer than
SCATTER_MIN_PIECES pieces always go as copies.

Needs no GPU and imports no CUDA library.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence

import structlog

__all__ = [
    "MEASURED_SIZES",
    "SCATTER_MIN_PIECES",
    "Measured",
    "TransferMethods",
    "choose_method",
    "fastest",
    "without",
]

log = structlog.get_logger("torpord.cuda")

SCATTER_MIN_PIECES = 8
MEASURED_SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10)

# [(piece size, the fastest method there)], by ascending piece size.
Measured = Sequence[tuple[int, str]]


def choose_method(measured: Measured, count: int, mean: int, *, kernels: bool) -> str:
    """How `count` pieces of `mean` bytes on average go to a device whose
    measurement is `measured` (empty: copies); `kernels`: whether the
    gather/scatter kernel can run (never chosen otherwise). A mean above the
    largest measured size takes what was fastest there."""
    if count < SCATTER_MIN_PIECES:
        return "copies"
    chosen = next((method for size, method in measured if mean <= size), None)
    if chosen is None:
        chosen = measured[-1][1] if measured else "copies"
    if chosen == "kernel" and not kernels:
        return "copies"
    return chosen


def fastest(times: Mapping[str, float]) -> str:
    """The method of the fewest seconds."""
    return min(times, key=times.__getitem__)


def without(measured: Measured, method: str) -> list[tuple[int, str]]:
    """The measurement with `method` replaced by copies (it failed)."""
    return [(size, "copies" if m == method else m) for size, m in measured]


class TransferMethods:
    """A device's measurement: None until taken, once, by the first chunk
    that needs it, however many workers ask at once."""

    def __init__(self, measured: Measured | None = None) -> None:
        self.measured: list[tuple[int, str]] | None = None if measured is None else list(measured)
        self._measuring = threading.Lock()

    def choose(
        self,
        count: int,
        mean: int,
        *,
        kernels: bool,
        measure: Callable[[], list[tuple[int, str]]],
        device: str = "",
    ) -> str:
        """choose_method, measuring first if nothing was. Without kernels
        nothing is measured (the measurement needs CuPy): copies, or what was
        measured before. A failed measurement means copies, not retried."""
        if count < SCATTER_MIN_PIECES:
            return "copies"
        measured = self.measured
        if measured is None:
            with self._measuring:  # (one measurement, whichever worker comes first)
                if self.measured is None and not kernels:
                    self.measured = []
                if self.measured is None:
                    try:
                        self.measured = measure()
                    except Exception:
                        log.exception("transfer measurement failed: copies only", device=device)
                        self.measured = []
                measured = self.measured
        return choose_method(measured, count, mean, kernels=kernels)

    def failed(self, method: str) -> None:
        """`method` failed on this device: copies instead from now on."""
        self.measured = without(self.measured or [], method)
