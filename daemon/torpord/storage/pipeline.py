"""The read pipeline: a checkpoint's bytes into many slabs, in large parallel chunks.

The byte ranges the layers need are cut into aligned chunks (`chunk_bytes`,
default 32 MiB), queued in forward layer order (so early layers complete
first, and a slab can move on while later chunks are still being read), and
read by `threads` workers across every file of the checkpoint at once.

How a chunk is read depends on `direct`:
- "off": buffered `preadv` straight into the slabs (no intermediate copy).
- "on": `O_DIRECT` into the worker's page-aligned staging buffer, then each
  piece is written to its slab (on a GPU host that write is the copy to the
  device, so the pinned staging buffer is the only stop on the way).
- "auto" (the default): first a buffered `preadv2(RWF_NOWAIT)` straight into
  the slabs, which succeeds only for bytes already in the page cache (a warm
  load is then a single copy; since Linux 5.9 such a read also starts
  readahead, so on fast storage some cold pages arrive within the call);
  whatever is not cached is read with O_DIRECT.
Where a filesystem refuses O_DIRECT the file falls back to buffered reads,
and the returned notes say so (they go to the Load's progress and the log).

Each layer's checksum (torpord.storage.checksum, of its whole slab, padding
zeroed) is taken by the worker that completes the layer, and `on_layer` is
told.

The chunks are cut by torpord.storage.chunks; the bytes go to the slab sinks
and staging buffers of torpord.storage.targets; every open and read goes
through `ReadOptions.io` (torpord.storage.fileio: the kernel's by default).
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torpord.errors import Unavailable
from torpord.storage.chunks import BLOCK, Chunk, Piece, plan_chunks
from torpord.storage.fileio import SYSTEM_IO, FileIO, OpenFile, read_failed, truncated
from torpord.storage.layers import LayerPlan
from torpord.storage.safetensors import Checkpoint
from torpord.storage.targets import PlainStaging, SlabSink, Staging
from torpord.timeline import Timeline

__all__ = [
    "DIRECT_MODES",
    "PlainStaging",
    "ReadOptions",
    "ReadReport",
    "SlabSink",
    "Staging",
    "read_layers",
]

DIRECT_MODES = ("auto", "on", "off")


@dataclass
class ReadReport:
    """What a read_layers call did, and when: each timeline holds the workers'
    intervals (time.monotonic()) in one activity, so both its wall time (while
    any worker was at it) and its busy time (summed over the workers) show."""

    notes: list[str] = field(default_factory=list)
    read: Timeline = field(default_factory=Timeline)  # in preadv
    transfer: Timeline = field(default_factory=Timeline)  # staged bytes to slabs (to the device)
    transfer_bytes: int = 0
    checksum: Timeline = field(default_factory=Timeline)
    cached_bytes: int = 0  # served from the page cache (auto mode's first try)


@dataclass(frozen=True)
class ReadOptions:
    chunk_bytes: int = 32 * 2**20
    threads: int = 8
    direct: str = "auto"
    io: FileIO = SYSTEM_IO  # the open and preadv calls (torpord.storage.fileio)


class _Run:
    def __init__(
        self,
        checkpoint: Checkpoint,
        plans: Sequence[LayerPlan],
        sinks: Sequence[SlabSink],
        options: ReadOptions,
        on_bytes: Callable[[int], None],
        on_layer: Callable[[int, str], None],
        should_stop: Callable[[], bool],
        staging: Staging,
    ) -> None:
        self.checkpoint, self.plans, self.sinks, self.options = checkpoint, plans, sinks, options
        self.staging = staging
        self.on_bytes, self.on_layer, self.should_stop = on_bytes, on_layer, should_stop
        self.report = ReadReport()
        self.notes = self.report.notes
        self.lock = threading.Lock()
        self.remaining = [sum(p.tensor.nbytes for p in plan.tensors) for plan in plans]
        self.views = [sink.view() for sink in sinks]
        self.files: dict[int, OpenFile] = {}
        self.error: BaseException | None = None

    def file(self, index: int) -> OpenFile:
        with self.lock:
            f = self.files.get(index)
            if f is None:
                f = self.files[index] = OpenFile(
                    self.checkpoint, index, self.options.direct, self.notes, self.options.io
                )
            return f

    def finish_piece(self, piece: Piece) -> None:
        with self.lock:
            self.remaining[piece.layer] -= piece.length
            done = self.remaining[piece.layer] == 0
        self.on_bytes(piece.length)
        if done:
            start = time.monotonic()
            digest = self.sinks[piece.layer].checksum()
            self._count(self.report.checksum, start)
            self.on_layer(piece.layer, digest)

    def _count(self, timeline: Timeline, start: float, nbytes: int = 0) -> None:
        """One worker was in `timeline`'s activity from start until now."""
        end = time.monotonic()
        with self.lock:
            timeline.add(start, end)
            self.report.transfer_bytes += nbytes

    def _cached(self, nbytes: int) -> None:
        with self.lock:
            self.report.cached_bytes += nbytes

    # -- one chunk -------------------------------------------------------------

    def read_chunk(self, chunk: Chunk, staging: mmap.mmap | None) -> None:
        f = self.file(chunk.file_index)
        direct = self.options.direct
        if direct != "on" and all(self.views[p.layer] is not None for p in chunk.pieces):
            flags = os.RWF_NOWAIT if f.nowait_ok and f.direct_ok else 0
            if self._straight_into_slabs(f, chunk, flags):
                return
        elif f.nowait_ok and staging is not None and self._staged_if_cached(f, chunk, staging):
            return  # slabs with no host view (device memory): cached bytes via staging
        if f.direct_ok and f.direct_fd is not None and staging is not None:
            try:
                self._staged(f, f.direct_fd, chunk, staging)
                return
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                with self.lock:
                    f.no_direct(self.notes, err)
        if all(self.views[p.layer] is not None for p in chunk.pieces):
            self._straight_into_slabs(f, chunk, 0)
        else:
            assert staging is not None
            self._staged(f, f.fd, chunk, staging)

    def _straight_into_slabs(self, f: OpenFile, chunk: Chunk, flags: int) -> bool:
        """preadv each piece into its slab; False if RWF_NOWAIT found a piece uncached."""
        for piece in chunk.pieces:
            view = self.views[piece.layer]
            assert view is not None
            done = 0
            while done < piece.length:
                # Every slice is released at once: one kept alive (by a traceback,
                # say) would stop the slab from ever being unmapped.
                with view[piece.slab_offset + done : piece.slab_offset + piece.length] as target:
                    start = time.monotonic()
                    try:
                        n = f.io.preadv(f.fd, [target], piece.file_offset + done, flags)
                    except BlockingIOError:
                        return False
                    except OSError as err:
                        if flags and err.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                            f.nowait_ok = False  # this filesystem can't say what is cached
                            return False
                        raise read_failed(f, piece.file_offset + done, err) from None
                    finally:
                        self._count(self.report.read, start)
                if n == 0:
                    raise truncated(f, piece.file_offset + done)
                if flags and n < piece.length - done:
                    return False  # partly cached: read the chunk the slow way
                done += n
        if flags:
            self._cached(chunk.end - chunk.start)
        for piece in chunk.pieces:
            self.finish_piece(piece)
        return True

    def _staged_if_cached(self, f: OpenFile, chunk: Chunk, staging: mmap.mmap) -> bool:
        """Read the chunk into staging only if the page cache holds all of it
        (buffered, RWF_NOWAIT), then hand the pieces on; False otherwise."""
        size = chunk.end - chunk.start
        got = 0
        while got < size:
            want = size - got
            with memoryview(staging)[got:size] as target:
                start = time.monotonic()
                try:
                    n = f.io.preadv(f.fd, [target], chunk.start + got, os.RWF_NOWAIT)
                except BlockingIOError:
                    return False
                except OSError as err:
                    if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                        f.nowait_ok = False
                        return False
                    raise read_failed(f, chunk.start + got, err) from None
                finally:
                    self._count(self.report.read, start)
            got += n
            if n == 0 or chunk.start + got >= f.src.size:
                break  # the end of the file (_deliver says if it came too soon)
            if n < want:
                return False  # partly cached: read the chunk the slow way
        self._cached(got)
        self._deliver(f, chunk, staging, got)
        return True

    def _staged(self, f: OpenFile, fd: int, chunk: Chunk, staging: mmap.mmap) -> None:
        size = chunk.end - chunk.start
        got = 0
        while got < size:
            with memoryview(staging)[got:size] as target:
                start = time.monotonic()
                try:
                    n = f.io.preadv(fd, [target], chunk.start + got)
                except OSError as err:
                    if err.errno == errno.EINVAL:
                        raise
                    raise read_failed(f, chunk.start + got, err) from None
                finally:
                    self._count(self.report.read, start)
            if n == 0:
                break
            got += n
            if fd == f.direct_fd and got % BLOCK:
                break  # a short O_DIRECT read ends at the end of the file
        self._deliver(f, chunk, staging, got)

    def _deliver(self, f: OpenFile, chunk: Chunk, staging: mmap.mmap, got: int) -> None:
        """Write the pieces of a chunk read into staging (`got` bytes) to their
        slabs: one write_many per slab (a GPU maps the slab once, queues the
        copies and waits once)."""
        by_layer: dict[int, list[Piece]] = {}
        for piece in chunk.pieces:
            if piece.file_offset - chunk.start + piece.length > got:
                raise truncated(f, chunk.start + got)
            by_layer.setdefault(piece.layer, []).append(piece)
        whole = memoryview(staging)
        try:
            for layer, pieces in by_layer.items():
                views = [
                    whole[p.file_offset - chunk.start : p.file_offset - chunk.start + p.length]
                    for p in pieces
                ]
                try:
                    start = time.monotonic()
                    self.sinks[layer].write_many(
                        [(p.slab_offset, v) for p, v in zip(pieces, views, strict=True)]
                    )
                    self._count(self.report.transfer, start, sum(p.length for p in pieces))
                finally:
                    for v in views:
                        v.release()
                for piece in pieces:
                    self.finish_piece(piece)
        finally:
            whole.release()

    # -- workers ---------------------------------------------------------------

    def worker(self, work: queue.SimpleQueue[Chunk | None]) -> None:
        staging = None
        try:
            if self.options.direct != "off" or not all(v is not None for v in self.views):
                staging = self.staging.take(self.options.chunk_bytes + BLOCK)
            while (chunk := work.get()) is not None:
                if self.error is not None:
                    continue
                if self.should_stop():
                    raise _Stopped
                self.read_chunk(chunk, staging)
        except BaseException as exc:  # the first error wins; the others drain the queue
            with self.lock:
                if self.error is None:
                    self.error = exc
            while work.get() is not None:
                pass
        finally:
            if staging is not None:
                self.staging.give(staging)


class _Stopped(Exception):
    pass


def read_layers(
    checkpoint: Checkpoint,
    plans: Sequence[LayerPlan],
    sinks: Sequence[SlabSink],
    options: ReadOptions,
    *,
    on_bytes: Callable[[int], None] = lambda n: None,
    on_layer: Callable[[int, str], None] = lambda i, digest: None,
    should_stop: Callable[[], bool] = lambda: False,
    staging: Staging | None = None,
) -> ReadReport:
    """Read every layer of `plans` into its sink; returns what it did, with notes
    for the operator (O_DIRECT fallbacks). Blocking: call it from a worker thread. `on_layer`
    gets each layer's index and checksum as it completes (from a worker).
    `should_stop` is polled between chunks; once true, raises StopRequested."""
    for plan, sink in zip(plans, sinks, strict=True):
        view = sink.view()
        end = 0
        for packed in sorted(plan.tensors, key=lambda p: p.slab_offset):
            _zero(sink, view, end, packed.slab_offset)
            end = packed.slab_offset + packed.tensor.nbytes
        _zero(sink, view, end, plan.size)
        if view is not None:
            view.release()
    run = _Run(
        checkpoint,
        plans,
        sinks,
        options,
        on_bytes,
        on_layer,
        should_stop,
        staging or PlainStaging(),
    )
    for li, left in enumerate(run.remaining):
        if left == 0:
            on_layer(li, sinks[li].checksum())
    work: queue.SimpleQueue[Chunk | None] = queue.SimpleQueue()
    for chunk in plan_chunks(checkpoint, plans, options.chunk_bytes):
        work.put(chunk)
    workers = [
        threading.Thread(target=run.worker, args=(work,), name=f"torpord-read-{i}", daemon=True)
        for i in range(max(1, options.threads))
    ]
    for _ in workers:
        work.put(None)
    started: list[threading.Thread] = []
    try:
        for w in workers:
            try:
                w.start()
            except RuntimeError as err:  # can't start new thread: go on with fewer
                if not started:
                    raise Unavailable(
                        f"cannot start a read thread: {err}", reason="SOURCE_READ_FAILED"
                    ) from None
                break
            started.append(w)
    finally:
        # Every started worker is joined before the fds close or the caller
        # frees a slab: none may still be writing.
        for w in started:
            w.join()
        for f in run.files.values():
            f.close()
        for view in run.views:
            if view is not None:
                view.release()
    if isinstance(run.error, _Stopped):
        raise StopRequested
    if run.error is not None:
        raise run.error
    return run.report


class StopRequested(Exception):
    """read_layers stopped because should_stop() said so."""


def _zero(sink: SlabSink, view: memoryview | None, start: int, end: int) -> None:
    if end <= start:
        return
    if view is not None:
        view[start:end] = bytes(end - start)
    else:
        sink.write(start, memoryview(bytes(end - start)))


__all__ += ["StopRequested"]
