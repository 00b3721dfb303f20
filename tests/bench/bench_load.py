"""Load a ~2.2 GiB, 4-shard checkpoint: Torpor against the raw read ceiling and safetensors.

    python -m tests.bench.bench_load [--dir DIR] [--runs N]

Baselines, measured in the same run on the same files:
- raw ceiling: the same number of threads reading the same files, in the same
  chunk size, into one preallocated buffer (O_DIRECT when cold, buffered warm);
- safetensors.torch.load_file of every shard (what engines do today).
Torpor is the daemon's core with the host backend: a LoadModel into an
emulated device, checksums included. Cold runs drop the files from the page
cache first (fsync + POSIX_FADV_DONTNEED).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import queue
import threading
from pathlib import Path

from torpord.backends.host import HostBackend
from torpord.core.manager import ManagerSettings, ModelManager
from torpord.storage.pipeline import ReadOptions

from tests.bench.common import (
    GiB,
    big_checkpoint,
    evict,
    files_of,
    machine,
    median_seconds,
    parser,
    row,
    warm,
)

OPTIONS = ReadOptions()


def raw_read(files: list[Path], direct: bool, buf: mmap.mmap | None = None) -> int:
    """Read every file into one page-aligned buffer with OPTIONS' threads and chunks:
    a fresh one (its pages faulted in by the reads, as a Load's new slabs are),
    or `buf`, already faulted in."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    chunk = OPTIONS.chunk_bytes
    fresh = buf is None
    if buf is None:
        buf = mmap.mmap(-1, buffer_size(files))
    work: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
    fds = [os.open(f, os.O_RDONLY | (os.O_DIRECT if direct else 0)) for f in files]
    base = 0
    for fi, size in enumerate(sizes):
        for off in range(0, size, chunk):
            work.put((fi, off, base + off))
        base += -(-size // chunk) * chunk  # keep every destination aligned
    for _ in range(OPTIONS.threads):
        work.put(None)

    def worker() -> None:
        view = memoryview(buf)
        while (item := work.get()) is not None:
            fi, off, at = item
            os.preadv(fds[fi], [view[at : at + chunk]], off)
        view.release()

    threads = [threading.Thread(target=worker) for _ in range(OPTIONS.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fd in fds:
        os.close(fd)
    if fresh:
        buf.close()
    return total


def buffer_size(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files) + len(files) * OPTIONS.chunk_bytes


def faulted_buffer(files: list[Path]) -> mmap.mmap:
    buf = mmap.mmap(-1, buffer_size(files), flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    return buf


def safetensors_load(files: list[Path], copy: bool) -> None:
    from safetensors.torch import load_file

    for f in files:
        tensors = load_file(f)
        for t in tensors.values():
            if copy:  # into memory of its own, as weights going to a device are
                t.clone()
            else:  # load_file maps the file: touch every byte as an engine would
                t.sum()


def torpor_load(path: Path, root: Path) -> None:
    async def run() -> None:
        backend = HostBackend(devices=1, device_capacity=4 * GiB, host_capacity=GiB)
        manager = ModelManager(
            backend, ManagerSettings(allowed_roots=(root.resolve(),), read=OPTIONS)
        )
        try:
            await manager.load("bench", str(path))
        finally:
            await manager.close(1.0)
            backend.close()

    asyncio.run(run())


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    path = big_checkpoint(args.dir)
    files = files_of(path)
    total = sum(f.stat().st_size for f in files)
    print(f"Load benchmark: {total / GiB:.2f} GiB in {len(files)} shards; {machine()}")
    print(f"  read options: {OPTIONS.chunk_bytes >> 20} MiB chunks, {OPTIONS.threads} threads")
    for label, prepare, direct in (
        ("page cache cold", lambda: evict(files), True),
        ("page cache warm", lambda: warm(files), False),
    ):
        raw = median_seconds(lambda d=direct: raw_read(files, d), args.runs, prepare)
        faulted = faulted_buffer(files)
        pure = median_seconds(lambda d=direct, b=faulted: raw_read(files, d, b), args.runs, prepare)
        faulted.close()
        st = median_seconds(lambda: safetensors_load(files, False), args.runs, prepare)
        st_copy = median_seconds(lambda: safetensors_load(files, True), args.runs, prepare)
        tp = median_seconds(lambda: torpor_load(path, args.dir), args.runs, prepare)
        print(f"\n {label}:")
        print(row("raw read ceiling (threads, fresh buffer)", raw, total))
        print(row("raw reads into an already-faulted buffer", pure, total, raw))
        print(row("safetensors.torch.load_file (mapped)", st, total, raw))
        print(row("safetensors load_file + copy to own memory", st_copy, total, raw))
        print(row("torpor LoadModel (host backend)", tp, total, raw))
        print(f"  => torpor / raw ceiling: {raw / tp:.2f}x (target >= 0.8)")
        print(
            f"  => torpor vs load_file: {st / tp:.2f}x; vs load_file + copy: {st_copy / tp:.2f}x"
            " (target >= 1.5)"
        )


if __name__ == "__main__":
    main()
