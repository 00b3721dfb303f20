"""The scrubber's reads, on its own thread: the chunk digests of a piece of
a host slab or of a disk cache entry (torpord.storage.checksum: one digest
per 1 MiB chunk, so the digests of pieces of whole chunks, in order, combine
to the slab's checksum)."""

from __future__ import annotations

import os

import xxhash

from torpord.backends.base import Backend, Slab
from torpord.storage.cachefiles import entry_is_lost
from torpord.storage.cacheformat import BadEntry
from torpord.storage.checksum import CHUNK
from torpord.storage.diskcache import DATA_OFFSET, DiskCache, DiskEntry
from torpord.storage.fileio import FileIO

__all__ = ["Corrupt", "hash_file", "hash_slab", "open_entry"]


class Corrupt(Exception):
    """The copy can't be what its checksum says (the message says why)."""


def _digests(piece: memoryview) -> list[int]:
    out = []
    for at in range(0, piece.nbytes, CHUNK):
        with piece[at : at + CHUNK] as chunk:
            out.append(xxhash.xxh3_64_intdigest(chunk))
    return out


def hash_slab(backend: Backend, slab: Slab, at: int, n: int) -> list[int]:
    """The chunk digests of `n` bytes of a host slab from `at` (a whole number
    of chunks, or the slab's end). The views are let go of before it returns."""
    with backend.view(slab) as view, view[at : at + n] as piece:
        return _digests(piece)


def open_entry(disk: DiskCache, entry: DiskEntry) -> int | None:
    """An fd of `entry`'s file; None if another file has taken its place."""
    try:
        fd = disk.open_entry(entry)
    except BadEntry as err:
        raise Corrupt(str(err)) from None
    except OSError as err:
        if not entry_is_lost(err):  # (the system is failing right now: later)
            raise
        raise Corrupt(f"it is gone or unreadable: {err.strerror}") from None
    st = os.fstat(fd)
    if st.st_ino == entry.inode and st.st_size == entry.file_bytes:
        return fd
    os.close(fd)
    if st.st_ino != entry.inode:
        return None
    raise Corrupt(f"its file has {st.st_size} bytes, not {entry.file_bytes}")


def hash_file(io: FileIO, fd: int, size: int, at: int, n: int) -> list[int]:
    """The chunk digests of `n` bytes of an entry's slab from `at`."""
    buf = bytearray(n)
    with memoryview(buf) as view:
        got = 0
        while got < n:
            with view[got:] as rest:
                read = io.preadv(fd, [rest], DATA_OFFSET + at + got)
            if read == 0:
                raise Corrupt(f"it ends after {at + got} of {size} bytes")
            got += read
        return _digests(view)
