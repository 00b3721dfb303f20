"""The slab checksum (torpord.storage.checksum) of a device slab's bytes
computed on the host, where the kernels can't run."""

from __future__ import annotations

from collections.abc import Iterator

import xxhash

from torpord.storage.checksum import CHUNK, combine

__all__ = ["host_checksum"]


def host_checksum(pieces: Iterator[memoryview]) -> str:
    """The slab checksum of bytes arriving in pieces of any size."""
    digests: list[int] = []
    pending = bytearray()
    for piece in pieces:
        at = 0
        if pending:
            at = min(CHUNK - len(pending), piece.nbytes)
            pending += piece[:at]
            if len(pending) == CHUNK:
                digests.append(xxhash.xxh3_64_intdigest(pending))
                pending.clear()
        while piece.nbytes - at >= CHUNK:
            digests.append(xxhash.xxh3_64_intdigest(piece[at : at + CHUNK]))
            at += CHUNK
        pending += piece[at:]
    if pending:
        digests.append(xxhash.xxh3_64_intdigest(pending))
    return combine(digests)
