"""The pinned host pool's allocator and its event gating, without a GPU
(the page-locking itself runs in tests/gpu)."""

from __future__ import annotations

import random
import threading

import pytest
from torpord.cuda.pinned import ALIGN, PinnedPool, Ranges
from torpord.errors import ResourceExhausted


class Copy:
    """A copy in flight: done when its thread says so (as a CUDA event is
    once the copy engine finishes)."""

    def __init__(self) -> None:
        self._done = threading.Event()

    def finish(self) -> None:
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait()


def test_ranges_are_aligned_disjoint_and_merge_back() -> None:
    ranges = Ranges(1 << 20)
    rng = random.Random(5)
    held: dict[int, int] = {}
    for _ in range(2000):
        if held and rng.random() < 0.45:
            offset = rng.choice(list(held))
            ranges.give(offset, held.pop(offset))
            continue
        size = rng.randint(1, 40_000)
        offset = ranges.take(size)
        if offset is None:
            assert ranges.largest < -(-size // ALIGN) * ALIGN
            continue
        assert offset % ALIGN == 0 and offset + size <= 1 << 20
        for other, n in held.items():  # never overlaps what is held
            assert offset + size <= other or other + n <= offset
        held[offset] = size
    for offset, size in held.items():
        ranges.give(offset, size)
    assert ranges.free == 1 << 20 and ranges.largest == 1 << 20  # all merged again


def test_giving_a_range_twice_is_refused() -> None:
    ranges = Ranges(64 * ALIGN)
    offset = ranges.take(ALIGN)
    assert offset is not None
    ranges.give(offset, ALIGN)
    with pytest.raises(ValueError):
        ranges.give(offset, ALIGN)


def test_a_freed_range_is_reused_only_after_its_copies_complete() -> None:
    pool = PinnedPool(8 * ALIGN, chunk=4 * ALIGN, register=False)
    try:
        a = pool.take(8 * ALIGN)
        copy = Copy()
        pool.free(a, 8 * ALIGN, [copy])
        assert pool._ranges.free == 0  # not yet: the copy may still read it
        taken: list[int] = []
        thread = threading.Thread(target=lambda: taken.append(pool.take(ALIGN)))
        thread.start()
        thread.join(0.2)
        assert thread.is_alive() and not taken  # waits for the copy, nothing else fits
        copy.finish()
        thread.join(10)
        assert taken == [0]
        pool.free(taken[0], ALIGN, [Copy()])  # a copy that never ends
        b = pool.take(4 * ALIGN)  # other bytes fit: no waiting
        assert b == ALIGN
    finally:
        pool.close()


def test_a_fragmented_pool_says_so() -> None:
    pool = PinnedPool(4 * ALIGN, register=False)
    try:
        offsets = [pool.take(ALIGN) for _ in range(4)]
        pool.free(offsets[0], ALIGN)
        pool.free(offsets[2], ALIGN)
        with pytest.raises(ResourceExhausted) as err:
            pool.take(2 * ALIGN)
        assert err.value.reason == "OUT_OF_MEMORY" and "fragmented" in err.value.message
    finally:
        pool.close()


def test_copies_are_split_at_chunk_boundaries() -> None:
    pool = PinnedPool(10 * ALIGN, chunk=4 * ALIGN, register=False)
    try:
        assert pool.pieces(3 * ALIGN, 6 * ALIGN) == [
            (3 * ALIGN, ALIGN),
            (4 * ALIGN, 4 * ALIGN),
            (8 * ALIGN, ALIGN),
        ]
        assert pool.pieces(0, 3 * ALIGN, limit=ALIGN) == [
            (0, ALIGN),
            (ALIGN, ALIGN),
            (2 * ALIGN, ALIGN),
        ]
        view = pool.view(ALIGN, 10)
        view[:] = b"0123456789"
        assert bytes(pool.view(ALIGN, 10)) == b"0123456789"
        view.release()
    finally:
        pool.close()
