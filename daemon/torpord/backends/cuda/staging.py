"""The read pipeline's staging buffers, page-locked (registered with the
driver), so a staged chunk goes to the device straight from where it was
read; and the registry that tells whether bytes lie in one of them."""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Callable

import numpy as np
import structlog

from torpord.cuda.driver import check, cu

__all__ = ["PinnedStaging", "address_of"]

log = structlog.get_logger("torpord.cuda")


def address_of(data: memoryview | mmap.mmap) -> int:
    """Where a buffer's bytes are (read-only ones too); holds nothing of it."""
    if isinstance(data, mmap.mmap):
        return ctypes.addressof(ctypes.c_char.from_buffer(data))
    return int(np.frombuffer(data, dtype=np.uint8).ctypes.data)


class PinnedStaging:
    """Staging buffers (torpord.storage.pipeline.Staging) registered with the
    driver while taken: address -> (size, device pointer)."""

    def __init__(self, any_context: Callable[[], None]) -> None:
        # Registration belongs to a context (PORTABLE: seen by all of them);
        # the read workers are fresh threads with none current.
        self._any_context = any_context
        self._lock = threading.Lock()
        self._pinned: dict[int, tuple[int, int]] = {}

    def take(self, size: int) -> mmap.mmap:
        buffer = mmap.mmap(-1, size)
        address = address_of(buffer)
        try:
            self._any_context()
            d = cu()
            flags = d.CU_MEMHOSTREGISTER_PORTABLE | d.CU_MEMHOSTREGISTER_DEVICEMAP
            check(d.cuMemHostRegister(address, size, flags), "cuMemHostRegister")
            try:
                # Where kernels see it (the same address with unified addressing).
                device = int(
                    check(d.cuMemHostGetDevicePointer(address, 0), "cuMemHostGetDevicePointer")
                )
            except BaseException:
                check(d.cuMemHostUnregister(address), "cuMemHostUnregister")
                raise
        except BaseException:
            buffer.close()
            raise
        with self._lock:
            self._pinned[address] = (size, device)
        return buffer

    def give(self, buffer: mmap.mmap) -> None:
        try:
            self.unpin(address_of(buffer))
        finally:
            try:
                buffer.close()
            except BufferError:  # a view still held (by a traceback): freed with it
                log.warning("staging buffer still viewed; freed when the view goes")

    def unpin(self, address: int) -> None:
        with self._lock:
            known = self._pinned.pop(address, None)
        if known is not None:
            self._any_context()
            check(cu().cuMemHostUnregister(address), "cuMemHostUnregister")

    def close(self) -> None:
        """Unpin what a read cut short left pinned."""
        with self._lock:
            addresses = list(self._pinned)
        for address in addresses:
            self.unpin(address)

    def holding(self, address: int, size: int) -> tuple[int, int] | None:
        """(start, device pointer) of the buffer holding [address, address +
        size), or None."""
        with self._lock:
            for start, (length, device) in self._pinned.items():
                if start <= address and address + size <= start + length:
                    return start, device
        return None

    def pinned(self) -> int:
        """How many buffers are taken (and pinned) now."""
        with self._lock:
            return len(self._pinned)
