"""Where the read pipeline writes: each layer's slab sink, and the staging
buffers its workers read into before a slab that has no host view (device
memory) takes the bytes."""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from typing import Protocol

__all__ = ["PlainStaging", "SlabSink", "Staging"]


class Staging(Protocol):
    """Where the workers' staging buffers come from: plain memory, or memory
    the backend can copy to its device from directly (pinned on a GPU)."""

    def take(self, size: int) -> mmap.mmap: ...

    def give(self, buffer: mmap.mmap) -> None:
        """The buffer is not used any more (every write from it returned)."""


class PlainStaging:
    def take(self, size: int) -> mmap.mmap:
        return mmap.mmap(-1, size)

    def give(self, buffer: mmap.mmap) -> None:
        buffer.close()


class SlabSink(Protocol):
    """Where one layer's bytes go."""

    def view(self) -> memoryview | None:
        """A writable view of the whole slab if it is host memory, else None."""

    def write(self, offset: int, data: memoryview) -> None:
        """Copy data into the slab at offset (a host-to-device copy on a GPU)."""

    def write_many(self, pieces: Sequence[tuple[int, memoryview]]) -> None:
        """Each (offset, data) of one chunk into the slab, as `write` does."""

    def checksum(self) -> str:
        """The checksum (torpord.storage.checksum) of the whole slab, hex."""
