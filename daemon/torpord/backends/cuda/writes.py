"""The read path's ways in and out of device slabs: a chunk's pieces from
pinned staging (copies, the gather/scatter kernel or the batched copy, as
measured), pageable bytes through the device's staging buffers, and a slab's
bytes out, a piece at a time."""

from __future__ import annotations

import ctypes
from collections.abc import Generator, Sequence

import structlog

from torpord.backends.base import Slab
from torpord.backends.cuda.calibration import measure
from torpord.backends.cuda.device import STAGING, Device
from torpord.backends.cuda.loader import KernelLoader
from torpord.backends.cuda.memory import Live
from torpord.backends.cuda.staging import PinnedStaging, address_of
from torpord.backends.cuda.windows import Windows
from torpord.cuda import driver
from torpord.cuda.driver import check, context, cu
from torpord.cuda.events import Event
from torpord.cuda.pinned import ALIGN

__all__ = ["Writes"]

log = structlog.get_logger("torpord.cuda")

# (slab offset, host address, length) of a piece to write.
Span = tuple[int, int, int]


class Writes:
    def __init__(
        self, live: Live, windows: Windows, staging: PinnedStaging, kernels: KernelLoader
    ) -> None:
        self._live = live
        self._windows = windows
        self._staging = staging
        self._kernels = kernels

    def write_many(self, slab: Slab, pieces: Sequence[tuple[int, memoryview]]) -> None:
        """Pieces into a device slab. Read into pinned staging (a chunk of the
        read pipeline): one window, one gather/scatter launch or the copies
        queued back to back, one wait. Otherwise piece by piece through the
        device's staging buffers."""
        if not pieces:
            return
        # (Addresses only: nothing here may hold an export of the staging
        # buffer, or a failure's traceback would keep it from closing.)
        spans = [(offset, address_of(data), data.nbytes) for offset, data in pieces]
        if not all(self._staging.holding(at, n) is not None for _, at, n in spans):
            for offset, data in pieces:
                self.write_staged(slab, offset, data)
            return
        dev = self._live.device(slab.device)
        kernels = self._kernels.unavailable is None
        method = dev.methods.choose(
            len(spans),
            sum(n for _, _, n in spans) // len(spans),
            kernels=kernels,
            measure=lambda: measure(dev, self._kernels.load(), self._staging),
            device=dev.uuid,
        )
        if method != "copies":
            try:
                (self._scatter if method == "kernel" else self._batch)(dev, slab, spans)
                return
            except Exception:
                log.exception(f"{method} failed: copies instead from now on", device=dev.uuid)
                dev.methods.failed(method)
        with self._windows.window(slab) as address:
            context(dev.ordinal)
            for offset, at, n in spans:
                check(
                    cu().cuMemcpyHtoDAsync(address + offset, at, n, dev.h2d),
                    "cuMemcpyHtoDAsync",
                )
            Event(dev.ordinal, dev.h2d).synchronize()  # before the window closes

    def _batch(self, dev: Device, slab: Slab, spans: Sequence[Span]) -> None:
        """The pieces into a slab in one cuMemcpyBatchAsync."""
        with self._windows.window(slab) as address:
            context(dev.ordinal)
            driver.memcpy_batch(
                [address + offset for offset, _, _ in spans],
                [at for _, at, _ in spans],
                [n for _, _, n in spans],
                dev.h2d,
            )
            Event(dev.ordinal, dev.h2d).synchronize()  # before the window closes

    def _scatter(self, dev: Device, slab: Slab, spans: Sequence[Span]) -> None:
        """The pieces of one pinned staging buffer into a slab in one launch
        of the gather/scatter kernel (reading the staging buffer over PCIe)."""
        import cupy

        where = self._staging.holding(spans[0][1], spans[0][2])
        assert where is not None
        host, device = where
        segments = [(at - host, offset, n) for offset, at, n in spans]
        if any(self._staging.holding(host + s, n) != where for s, _, n in segments):
            raise ValueError("pieces from several staging buffers")
        kernels = self._kernels.load()
        with self._windows.window(slab) as address, cupy.cuda.Device(dev.ordinal):
            stream = cupy.cuda.ExternalStream(int(dev.h2d), dev.ordinal)
            kernels.gather_scatter(device, address, segments, stream=stream)
            Event(dev.ordinal, dev.h2d).synchronize()  # before the window closes

    def write_staged(self, slab: Slab, offset: int, data: memoryview) -> None:
        """Pageable bytes into a device slab, through the device's own pinned
        staging buffers, each reused only once its last copy completed."""
        dev = self._live.device(slab.device)
        src, size = address_of(data), data.nbytes
        events = []
        with self._windows.window(slab) as address:
            try:
                for at in range(0, size, STAGING):
                    n = min(STAGING, size - at)
                    staging = dev.staging.get()
                    try:
                        if staging.event is not None:
                            staging.event.synchronize()
                        ctypes.memmove(staging.address, src + at, n)
                        context(dev.ordinal)
                        check(
                            cu().cuMemcpyHtoDAsync(
                                address + offset + at, staging.address, n, dev.h2d
                            ),
                            "cuMemcpyHtoDAsync",
                        )
                        staging.event = Event(dev.ordinal, dev.h2d)
                        events.append(staging.event)
                    finally:
                        dev.staging.put(staging)
            finally:
                for event in events:  # done before the window closes
                    event.synchronize()

    def read_out(self, slab: Slab) -> Generator[memoryview, None, None]:
        """A device slab's bytes through a pinned staging buffer, a piece at
        a time (to the disk cache, say)."""
        dev = self._live.device(slab.device)
        # A buffer of its own (the device's staging buffers serve the read path
        # and the disk cache may write several layers at once).
        buffer = self._staging.take(min(STAGING, max(ALIGN, -(-slab.size // ALIGN) * ALIGN)))
        try:
            host = address_of(buffer)
            size = len(buffer)
            with self._windows.window(slab) as address:
                for at in range(0, slab.size, size):
                    n = min(size, slab.size - at)
                    context(dev.ordinal)
                    check(
                        cu().cuMemcpyDtoHAsync(host, address + at, n, dev.d2h),
                        "cuMemcpyDtoHAsync",
                    )
                    Event(dev.ordinal, dev.d2h).synchronize()
                    with memoryview(buffer)[:n] as piece:
                        yield piece
        finally:
            self._staging.give(buffer)
