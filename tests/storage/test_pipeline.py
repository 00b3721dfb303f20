"""The read pipeline: every mode lands exactly the checkpoint's bytes, in forward order."""

from __future__ import annotations

import errno
import fcntl
import itertools
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from torpor.testing import make_checkpoint
from torpord.errors import FailedPrecondition, Unavailable
from torpord.storage.checkpoint import open_checkpoint
from torpord.storage.checksum import slab_checksum
from torpord.storage.fileio import Buffer, SystemIO
from torpord.storage.layers import LayerPlan, plan_layers
from torpord.storage.pipeline import PlainStaging, ReadOptions, StopRequested, read_layers
from torpord.storage.safetensors import Checkpoint, SourceFile

from .sinks import Sink


def expected(ckpt: Checkpoint, plan: LayerPlan) -> bytes:
    out = bytearray(plan.size)
    for packed in plan.tensors:
        t = packed.tensor
        with open(ckpt.files[t.file_index].path, "rb") as f:
            f.seek(t.file_offset)
            out[packed.slab_offset : packed.slab_offset + t.nbytes] = f.read(t.nbytes)
    return bytes(out)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    root = tmp_path_factory.mktemp("pipeline")
    return open_checkpoint(make_checkpoint(root / "m", layers=5, hidden=96, shards=3))


CASES = list(
    itertools.product(("auto", "on", "off"), (1, 4), (4096, 65536, 32 * 2**20), (True, False))
)


@pytest.mark.parametrize(("direct", "threads", "chunk", "addressable"), CASES)
def test_every_mode_lands_exact_bytes(
    ckpt: Checkpoint, direct: str, threads: int, chunk: int, addressable: bool
) -> None:
    plans = plan_layers(ckpt)
    sinks = [Sink(plan.size, addressable) for plan in plans]
    landed: dict[int, str] = {}
    counted: list[int] = []
    report = read_layers(
        ckpt,
        plans,
        sinks,
        ReadOptions(chunk_bytes=chunk, threads=threads, direct=direct),
        on_bytes=counted.append,
        on_layer=lambda i, digest: landed.setdefault(i, digest),
    )
    assert report.notes == []  # this filesystem takes O_DIRECT
    assert report.read.busy > 0 and report.checksum.busy > 0
    # Workers overlap: their summed time is at least the time any was at it.
    assert 0 < report.read.wall <= report.read.busy + 1e-9
    if direct == "on" or not addressable:  # staged: every byte crossed to the slab
        assert report.transfer_bytes == ckpt.data_bytes
    for i, (plan, sink) in enumerate(zip(plans, sinks, strict=True)):
        assert bytes(sink.data) == expected(ckpt, plan), plan.name
        assert landed[i] == slab_checksum(expected(ckpt, plan))
    assert sorted(landed) == list(range(len(plans)))
    assert sum(counted) == ckpt.data_bytes
    if chunk == 4096:
        assert len(counted) > len(plans)  # progress moves inside a layer


def test_one_thread_completes_layers_in_forward_order(ckpt: Checkpoint) -> None:
    plans = plan_layers(ckpt)
    order: list[int] = []
    read_layers(
        ckpt,
        plans,
        [Sink(p.size) for p in plans],
        ReadOptions(chunk_bytes=8192, threads=1),
        on_layer=lambda i, _: order.append(i),
    )
    assert order == list(range(len(plans)))


class NoDirect(SystemIO):
    """A filesystem that refuses to open for O_DIRECT."""

    def open(self, src: SourceFile, direct: bool) -> int:
        if direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return super().open(src, direct)


def test_a_filesystem_without_o_direct_falls_back_and_says_so(ckpt: Checkpoint) -> None:
    plans = plan_layers(ckpt)
    sinks = [Sink(p.size) for p in plans]
    notes = read_layers(ckpt, plans, sinks, ReadOptions(direct="on", io=NoDirect())).notes
    assert len(notes) == len(ckpt.files)
    assert all("O_DIRECT refused" in note and "buffered" in note for note in notes)
    for plan, sink in zip(plans, sinks, strict=True):
        assert bytes(sink.data) == expected(ckpt, plan)


def test_a_truncated_file_is_source_changed(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "t.safetensors", layers=2)
    ckpt = open_checkpoint(path)
    plans = plan_layers(ckpt)
    os.truncate(path, ckpt.files[0].size)  # same size: opening passes ...
    with open(path, "r+b") as f:
        f.truncate(ckpt.files[0].size - 1000)  # ... then it shrinks
    with pytest.raises(FailedPrecondition) as err:
        read_layers(ckpt, plans, [Sink(p.size) for p in plans], ReadOptions(direct="off"))
    assert err.value.reason == "SOURCE_CHANGED"


class FailingDisk(SystemIO):
    """A disk whose every read fails."""

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
        raise OSError(errno.EIO, "Input/output error")


def test_a_read_error_is_unavailable_and_names_the_offset(ckpt: Checkpoint) -> None:
    plans = plan_layers(ckpt)
    with pytest.raises(Unavailable) as err:
        read_layers(
            ckpt, plans, [Sink(p.size) for p in plans], ReadOptions(threads=3, io=FailingDisk())
        )
    assert err.value.reason == "SOURCE_READ_FAILED"
    assert "offset" in err.value.metadata and "Input/output error" in err.value.message


def test_should_stop_stops_between_chunks(ckpt: Checkpoint) -> None:
    plans = plan_layers(ckpt)
    landed: list[int] = []
    with pytest.raises(StopRequested):
        read_layers(
            ckpt,
            plans,
            [Sink(p.size) for p in plans],
            ReadOptions(chunk_bytes=4096, threads=1),
            on_layer=lambda i, _: landed.append(i),
            should_stop=lambda: len(landed) >= 1,
        )
    assert 1 <= len(landed) < len(plans)


class Recorded(SystemIO):
    """The kernel's reads, each noted: whether it went around the page cache."""

    def __init__(self) -> None:
        self.direct_fds: set[int] = set()
        self.direct_reads = 0

    def open(self, src: SourceFile, direct: bool) -> int:
        fd = super().open(src, direct)
        if direct:
            self.direct_fds.add(fd)
        return fd

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
        if fd in self.direct_fds:
            self.direct_reads += 1
        return super().preadv(fd, buffers, offset, flags)


class Cold(Recorded):
    """A slow disk's view of a file not in the page cache: RWF_NOWAIT reads
    answer EAGAIN (see go_cold)."""

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return super().preadv(fd, buffers, offset, flags)


def go_cold(ckpt: Checkpoint) -> Cold:
    """Take the checkpoint out of the page cache, as a slow disk would see it;
    returns the reads to make on it.

    The files are really evicted (fsync, then DONTNEED), but that alone doesn't
    make `RWF_NOWAIT` fail: since Linux 5.9 such a read starts readahead, and on
    fast storage the pages can arrive within the call. So buffered RWF_NOWAIT
    reads also answer EAGAIN here, which is what the kernel says for pages that
    aren't cached on a disk that can't serve them without blocking.
    """
    for f in ckpt.files:
        fd = os.open(f.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return Cold()


def test_auto_reads_cached_bytes_straight_and_the_rest_direct(tmp_path: Path) -> None:
    ckpt = open_checkpoint(make_checkpoint(tmp_path / "m", layers=3, hidden=128, shards=2))
    plans = plan_layers(ckpt)
    warm = Recorded()
    sinks = [Sink(p.size) for p in plans]
    read_layers(ckpt, plans, sinks, ReadOptions(chunk_bytes=65536, io=warm))
    assert warm.direct_reads == 0  # just written: all in the page cache, read straight in
    cold = go_cold(ckpt)
    sinks = [Sink(p.size) for p in plans]
    read_layers(ckpt, plans, sinks, ReadOptions(chunk_bytes=65536, io=cold))
    assert cold.direct_reads  # not cached: O_DIRECT through the staging buffer
    for plan, sink in zip(plans, sinks, strict=True):
        assert bytes(sink.data) == expected(ckpt, plan)


class RefusesDirectReads(SystemIO):
    """A filesystem that opens O_DIRECT but refuses the reads."""

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return super().preadv(fd, buffers, offset, flags)


def test_o_direct_refused_at_read_time_by_many_threads_never_mixes_files(
    tmp_path: Path,
) -> None:
    """A filesystem that opens O_DIRECT but refuses the reads: every worker falls
    back, and no read ever lands another file's bytes (fds stay open all run)."""
    ckpt = open_checkpoint(make_checkpoint(tmp_path / "m", layers=6, hidden=128, shards=4))
    plans = plan_layers(ckpt)
    io = RefusesDirectReads()
    for _ in range(20):
        sinks = [Sink(p.size) for p in plans]
        report = read_layers(
            ckpt, plans, sinks, ReadOptions(chunk_bytes=1 << 20, threads=8, direct="on", io=io)
        )
        assert len(report.notes) == len(ckpt.files)  # one note a file
        for plan, sink in zip(plans, sinks, strict=True):
            assert bytes(sink.data) == expected(ckpt, plan)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_a_tmpfs_source_loads_with_the_default_mode() -> None:
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        ckpt = open_checkpoint(make_checkpoint(Path(tmp) / "m", layers=2, shards=2))
        plans = plan_layers(ckpt)
        sinks = [Sink(p.size) for p in plans]
        read_layers(ckpt, plans, sinks, ReadOptions())
        for plan, sink in zip(plans, sinks, strict=True):
            assert bytes(sink.data) == expected(ckpt, plan)


class CountingStaging(PlainStaging):
    """Plain staging buffers, counted (as a GPU backend pins and unpins them)."""

    def __init__(self) -> None:
        self.taken: list[int] = []
        self.given: list[int] = []

    def take(self, size: int) -> mmap.mmap:
        buffer = super().take(size)
        self.taken.append(id(buffer))
        return buffer

    def give(self, buffer: mmap.mmap) -> None:
        self.given.append(id(buffer))
        super().give(buffer)


def test_cached_bytes_reach_device_slabs_through_staging_without_o_direct(
    ckpt: Checkpoint,
) -> None:
    for f in ckpt.files:  # warm the page cache
        with open(f.path, "rb") as fh:
            while fh.read(1 << 20):
                pass
    plans = plan_layers(ckpt)
    sinks = [Sink(plan.size, addressable=False) for plan in plans]
    staging = CountingStaging()
    report = read_layers(
        ckpt, plans, sinks, ReadOptions(chunk_bytes=65536, threads=2), staging=staging
    )
    # Every chunk came from the page cache (buffered, RWF_NOWAIT), none from disk.
    assert report.cached_bytes >= ckpt.data_bytes
    for plan, sink in zip(plans, sinks, strict=True):
        assert bytes(sink.data) == expected(ckpt, plan), plan.name
    assert staging.taken and sorted(staging.taken) == sorted(staging.given)


def test_uncached_bytes_go_around_the_page_cache(ckpt: Checkpoint) -> None:
    cold = go_cold(ckpt)
    plans = plan_layers(ckpt)
    sinks = [Sink(plan.size, addressable=False) for plan in plans]
    report = read_layers(ckpt, plans, sinks, ReadOptions(chunk_bytes=65536, threads=2, io=cold))
    assert report.cached_bytes == 0  # (read with O_DIRECT instead)
    for plan, sink in zip(plans, sinks, strict=True):
        assert bytes(sink.data) == expected(ckpt, plan), plan.name


class BatchSink(Sink):
    """A device-like slab that records how its pieces arrive."""

    def __init__(self, size: int) -> None:
        super().__init__(size, addressable=False)
        self.batches: list[int] = []

    def write_many(self, pieces: Sequence[tuple[int, memoryview]]) -> None:
        self.batches.append(len(pieces))
        super().write_many(pieces)


def test_a_chunks_pieces_reach_each_slab_in_one_batch(ckpt: Checkpoint) -> None:
    plans = plan_layers(ckpt)
    sinks = [BatchSink(plan.size) for plan in plans]
    read_layers(ckpt, plans, sinks, ReadOptions(chunk_bytes=32 * 2**20, threads=1))
    # One big chunk per file: each slab gets one batch per file it reads from,
    # however many tensors that is.
    for plan, sink in zip(plans, sinks, strict=True):
        files = {p.tensor.file_index for p in plan.tensors}
        assert len(sink.batches) == len(files), plan.name
        assert sum(sink.batches) == len(plan.tensors)
        assert bytes(sink.data) == expected(ckpt, plan)
