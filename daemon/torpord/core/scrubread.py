"""The scrubber's reads, on its own thread: the chunk digests of a piece of
a host slab or of a disk cache entry (torpord.storage.checksum: one digest
per 1 MiB chunk, so the digests of pieces of whole chunks, in order, combine
to the slab's checksum).

A disk copy is checked on the disk, not in the page cache: each piece's
pages are dropped from the cache before it is read (a cached copy would be
checked in RAM, where it may be fine while the disk's is not) and after (a
full pass must not push the node's other files out of the cache), and the
kernel reads no further ahead than asked. Where the filesystem keeps no
page cache of its own (tmpfs: the pages are the file), that does nothing,
and there is no other copy to check.
"""

from __future__ import annotations

import contextlib
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
        _advise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # (no read-ahead past a piece)
        return fd
    os.close(fd)
    if st.st_ino != entry.inode:
        return None
    raise Corrupt(f"its file has {st.st_size} bytes, not {entry.file_bytes}")


def hash_file(io: FileIO, fd: int, size: int, at: int, n: int) -> list[int]:
    """The chunk digests of `n` bytes of an entry's slab from `at`, read from
    the disk, and not left in the page cache."""
    buf = bytearray(n)
    start = DATA_OFFSET + at
    _advise(fd, start, n, os.POSIX_FADV_DONTNEED)
    try:
        with memoryview(buf) as view:
            got = 0
            while got < n:
                with view[got:] as rest:
                    read = io.preadv(fd, [rest], start + got)
                if read == 0:
                    raise Corrupt(f"it ends after {at + got} of {size} bytes")
                got += read
            return _digests(view)
    finally:
        _advise(fd, start, n, os.POSIX_FADV_DONTNEED)


def _advise(fd: int, offset: int, n: int, advice: int) -> None:
    # Advice only: where the kernel refuses it, the read is still right.
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, n, advice)
