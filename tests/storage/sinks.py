"""A slab sink in plain memory, for the storage tests that read into slabs."""

from __future__ import annotations

import os
from collections.abc import Sequence

from torpord.storage.checksum import slab_checksum


class Sink:
    """A slab in a bytearray; `addressable=False` plays a GPU slab (no view)."""

    def __init__(self, size: int, addressable: bool = True) -> None:
        self.data = bytearray(os.urandom(size))  # garbage, as a reused allocation holds
        self.addressable = addressable
        self.writes = 0

    def view(self) -> memoryview | None:
        return memoryview(self.data) if self.addressable else None

    def write(self, offset: int, data: memoryview) -> None:
        self.writes += 1
        self.data[offset : offset + data.nbytes] = data

    def write_many(self, pieces: Sequence[tuple[int, memoryview]]) -> None:
        for offset, data in pieces:
            self.write(offset, data)

    def checksum(self) -> str:
        return slab_checksum(self.data)
