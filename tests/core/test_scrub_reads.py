"""The scrubber checks a disk copy on the disk, not in the page cache, and
leaves the cache as it found it (core/scrubread.py)."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from torpord.storage.diskcache import DATA_OFFSET
from torpord.storage.fileio import Buffer, SystemIO
from torpord.types import Tier

from .harness import disk_harness

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident(fd: int, offset: int, n: int) -> int:
    """How many pages of `fd`'s bytes [offset, offset + n) are in the page
    cache (mincore on a mapping of them; the mapping itself reads nothing)."""
    page = mmap.PAGESIZE
    start = offset - offset % page
    length = offset + n - start
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr == _MAP_FAILED:
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        vec = (ctypes.c_ubyte * ((length + page - 1) // page))()
        if _libc.mincore(addr, length, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(b & 1 for b in vec)
    finally:
        _libc.munmap(addr, length)


class SeenCached(SystemIO):
    """The kernel's reads; for each of the scrubber's, how many of the pages
    it asks for were in the page cache just before (a read served from RAM)."""

    def __init__(self) -> None:
        self.cached: list[int] = []  # one per scrubber read

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
        if threading.current_thread().name.startswith("torpord-scrub"):
            n = sum(len(memoryview(b)) for b in buffers)
            self.cached.append(resident(fd, offset, n))
        return super().preadv(fd, buffers, offset, flags)


def page_cache_is_separate(folder: Path) -> bool:
    """Whether the kernel drops a file's clean pages here when told to (not
    on tmpfs, where the pages are the file)."""
    probe = folder / "probe"
    probe.write_bytes(b"x" * 4 * mmap.PAGESIZE)
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.read(fd, 4 * mmap.PAGESIZE)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return resident(fd, 0, 4 * mmap.PAGESIZE) == 0
    finally:
        os.close(fd)
        probe.unlink()


async def test_a_disk_copy_is_read_from_the_disk_and_left_out_of_the_cache(
    tmp_path: Path, ckpt: Path
) -> None:
    # tmp_path: on this project's machines a disk-backed filesystem (ext4 here);
    # where it is tmpfs, there is no page cache apart from the file to test.
    if not page_cache_is_separate(tmp_path):
        pytest.skip(f"{tmp_path} keeps no page cache apart from its files (tmpfs?)")
    io = SeenCached()
    h = disk_harness(tmp_path, io=io, scrub_rate=1 << 40, scrub_interval=0)
    scrub = h.manager.scrubber
    assert scrub is not None
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.sleep("m", 2, disk_copy=True)
        entries = [layer.disk for layer in h.manager.registry.models["m"].layers]
        fds = [os.open(e.path, os.O_RDONLY) for e in entries if e is not None]
        try:
            assert len(fds) == len(entries)
            for fd in fds:  # every copy in the page cache, as a recent write leaves it
                size = os.fstat(fd).st_size
                os.pread(fd, size, 0)
                assert resident(fd, DATA_OFFSET, size - DATA_OFFSET) > 0
            await scrub.sweep()
            assert scrub.checked_bytes[Tier.DISK] == sum(e.size for e in entries if e is not None)
            assert scrub.corrupt[Tier.DISK] == 0
            # Every read came from the disk: none of its pages were cached.
            assert len(io.cached) >= len(fds) and set(io.cached) == {0}
            # And the pass left none of the copies' pages in the cache.
            assert [
                resident(fd, DATA_OFFSET, os.fstat(fd).st_size - DATA_OFFSET) for fd in fds
            ] == [0] * len(fds)
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        await h.close()
