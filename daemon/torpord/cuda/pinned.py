"""The pinned host pool: the HOST tier on a GPU machine.

At start the pool maps its whole byte budget (no power-of-two rounding) and
page-locks it in fixed chunks (`cuMemHostRegister` per chunk: one huge
registration can fail on recent drivers). Host slabs are aligned ranges of
the pool (contiguous, so the read pipeline and the disk cache see one view);
a copy never spans two chunks (`pieces` splits it), since each chunk is its
own registration.

A freed range comes back for reuse only once the copies that last used it
have completed: `free` takes their events, and `take` reuses a range only
after its events are done (it waits for them when nothing else fits).

`Ranges` (the allocator) and the event gating need no GPU; `PinnedPool`
registers with the driver unless told not to.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from torpord.errors import ResourceExhausted

__all__ = ["Completion", "PinnedPool", "Ranges"]

ALIGN = 4096


class Completion(Protocol):
    """Something that finishes: a CUDA event recorded after a copy."""

    def query(self) -> bool:
        """True once finished (never blocks)."""

    def synchronize(self) -> None:
        """Block until finished."""


class Ranges:
    """First-fit allocation of aligned byte ranges in [0, capacity); freed
    ranges merge with their free neighbours. Not thread-safe."""

    def __init__(self, capacity: int, align: int = ALIGN) -> None:
        self.capacity = capacity
        self.align = align
        # Free ranges as sorted starts and their lengths.
        self._starts: list[int] = [0] if capacity else []
        self._lengths: dict[int, int] = {0: capacity} if capacity else {}

    def _round(self, size: int) -> int:
        return max(self.align, -(-size // self.align) * self.align)

    def take(self, size: int) -> int | None:
        """The offset of a free range of `size` bytes (rounded up to the
        alignment), or None if no free range is that long."""
        need = self._round(size)
        for start in self._starts:
            length = self._lengths[start]
            if length >= need:
                self._starts.remove(start)
                del self._lengths[start]
                if length > need:
                    self._insert(start + need, length - need)
                return start
        return None

    def give(self, offset: int, size: int) -> None:
        """Return a range `take` gave out."""
        length = self._round(size)
        if offset < 0 or offset + length > self.capacity:
            raise ValueError(f"range {offset}+{length} is outside the pool")
        i = bisect.bisect_left(self._starts, offset)
        if i < len(self._starts) and self._starts[i] < offset + length:
            raise ValueError(f"range {offset}+{length} is already free")
        if i > 0 and self._starts[i - 1] + self._lengths[self._starts[i - 1]] > offset:
            raise ValueError(f"range {offset}+{length} is already free")
        # Merge with the free neighbours on either side.
        if i < len(self._starts) and self._starts[i] == offset + length:
            nxt = self._starts.pop(i)
            length += self._lengths.pop(nxt)
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._lengths[prev] == offset:
                self._lengths[prev] += length
                return
        self._insert(offset, length)

    def _insert(self, start: int, length: int) -> None:
        bisect.insort(self._starts, start)
        self._lengths[start] = length

    @property
    def free(self) -> int:
        return sum(self._lengths.values())

    @property
    def largest(self) -> int:
        return max(self._lengths.values(), default=0)


@dataclass
class _Pending:
    offset: int
    size: int
    events: Sequence[Completion]

    def done(self) -> bool:
        return all(e.query() for e in self.events)


class PinnedPool:
    """The byte budget of host memory, mapped and page-locked at start."""

    def __init__(
        self,
        capacity: int,
        chunk: int = 1 << 30,
        *,
        register: bool = True,
        context: Callable[[], None] | None = None,
    ) -> None:
        """`context` makes the CUDA context the pool is registered in current
        (registration is PORTABLE: every context sees it)."""
        self._context = context
        self.capacity = -(-capacity // ALIGN) * ALIGN
        self.chunk = -(-chunk // ALIGN) * ALIGN
        self._map = mmap.mmap(-1, max(self.capacity, ALIGN))
        self._anchor = (ctypes.c_char * len(self._map)).from_buffer(self._map)
        self.address = ctypes.addressof(self._anchor)
        self._ranges = Ranges(self.capacity)
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()
        self._registered: list[int] = []
        if register:
            self._register()

    def _register(self) -> None:
        from torpord.cuda.driver import check, cu, init

        driver = cu()
        init()
        if self._context is not None:
            self._context()
        flags = driver.CU_MEMHOSTREGISTER_PORTABLE
        try:
            for start in range(0, self.capacity, self.chunk):
                length = min(self.chunk, self.capacity - start)
                check(
                    driver.cuMemHostRegister(self.address + start, length, flags),
                    "cuMemHostRegister",
                )
                self._registered.append(start)
        except BaseException:
            self._unregister()
            raise

    def _unregister(self) -> None:
        if not self._registered:
            return
        from torpord.cuda.driver import check, cu

        driver = cu()
        if self._context is not None:
            self._context()
        for start in self._registered:
            check(driver.cuMemHostUnregister(self.address + start), "cuMemHostUnregister")
        self._registered.clear()

    def take(self, size: int) -> int:
        """The offset of `size` free bytes (the budget was reserved by the
        caller). Waits for the copies of freed ranges if only they would fit."""
        with self._lock:
            self._reap(wait=False)
            offset = self._ranges.take(size)
            if offset is None and self._pending:
                self._reap(wait=True)
                offset = self._ranges.take(size)
            if offset is None:
                raise ResourceExhausted(
                    f"pinned host pool: no {size}-byte range free (largest"
                    f" {self._ranges.largest} of {self._ranges.free} free bytes; the pool is"
                    " fragmented)",
                    reason="OUT_OF_MEMORY",
                    metadata={"asked": size, "largest_free": self._ranges.largest},
                )
            return offset

    def free(self, offset: int, size: int, events: Sequence[Completion] = ()) -> None:
        """Give a range back once `events` (the copies that last used it) are done."""
        with self._lock:
            self._pending.append(_Pending(offset, size, list(events)))
            self._reap(wait=False)

    def _reap(self, *, wait: bool) -> None:
        keep = []
        for pending in self._pending:
            if wait:
                for event in pending.events:
                    event.synchronize()
            if wait or pending.done():
                self._ranges.give(pending.offset, pending.size)
            else:
                keep.append(pending)
        self._pending = keep

    def view(self, offset: int, size: int) -> memoryview:
        return memoryview(self._map)[offset : offset + size]

    def pieces(self, offset: int, size: int, limit: int | None = None) -> list[tuple[int, int]]:
        """(offset, length) pieces of a range, none crossing a chunk (each is
        one registration) nor longer than `limit`."""
        out = []
        at, end = offset, offset + size
        while at < end:
            stop = min(end, (at // self.chunk + 1) * self.chunk)
            if limit is not None:
                stop = min(stop, at + limit)
            out.append((at, stop - at))
            at = stop
        return out

    def close(self) -> None:
        self._unregister()
        del self._anchor
        self._map.close()
