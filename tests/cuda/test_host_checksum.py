"""The CUDA backend's checksum without kernels: the slab checksum of bytes
that arrive from the GPU in pieces of any size (torpord.storage.checksum)."""

from __future__ import annotations

import itertools
import random

import pytest
from torpord.backends.cuda.checksum import host_checksum
from torpord.storage.checksum import CHUNK, slab_checksum


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 12345])
def test_pieces_of_any_size_give_the_whole_slabs_checksum(size: int) -> None:
    rng = random.Random(size)
    data = rng.randbytes(size)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, size), min(size - 1, 7))) if size > 1 else []
        bounds = [0, *cuts, size]
        pieces = (memoryview(data)[a:b] for a, b in itertools.pairwise(bounds))
        assert host_checksum(pieces) == slab_checksum(data)
    whole = (memoryview(data)[at : at + CHUNK] for at in range(0, size, CHUNK))
    assert host_checksum(whole) == slab_checksum(data)
