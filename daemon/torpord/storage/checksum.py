"""The slab checksum: one definition for the host and the GPU.

A slab's checksum is XXH3-64 (seed 0) of the little-endian concatenation of
the XXH3-64 digests of its 1 MiB chunks (the last chunk may be shorter; an
empty slab has no chunks). Chunks make it parallel: the host hashes them with
the xxhash library, the GPU with one thread block per chunk
(`cuda_kernels/checksum.cu`), and both finish with the same small
hash of the digests, so a wake can verify a slab where it is without copying
it back.

Digests name their definition (`KIND`) wherever they are stored, so a change
of definition makes old stored digests stale, never wrong.
"""

from __future__ import annotations

import struct

import xxhash

__all__ = ["CHUNK", "KIND", "combine", "slab_checksum"]

CHUNK = 1 << 20
KIND = "xxh3-64/1MiB-chunks"


def slab_checksum(data: memoryview | bytes | bytearray) -> str:
    """The checksum of a slab's bytes, hex (16 digits)."""
    view = memoryview(data).cast("B")
    return combine(
        [xxhash.xxh3_64_intdigest(view[at : at + CHUNK]) for at in range(0, len(view), CHUNK)]
    )


def combine(digests: list[int]) -> str:
    """The slab checksum from its chunks' digests, in order."""
    return xxhash.xxh3_64_hexdigest(struct.pack(f"<{len(digests)}Q", *digests))
