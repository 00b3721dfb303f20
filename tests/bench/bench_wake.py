"""Wake from level 1, and Offload HOST -> DEVICE, against a plain multi-threaded memcpy.

    python -m tests.bench.bench_wake [--dir DIR] [--runs N]

The model (~2.2 GiB) is preloaded to HOST (asleep at level 1). Baseline:
the same bytes copied with ctypes.memmove by the same number of threads
(4) from a buffer in memory to a fresh buffer, as a wake fills fresh device
slabs; the copy into an already-faulted buffer is shown too.
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import threading
import time

from torpord.backends.host import HostBackend
from torpord.core.manager import ManagerSettings, ModelManager
from torpord.types import Tier

from tests.bench.common import GiB, big_checkpoint, machine, parser, row

THREADS = 4
PIECE = 16 * 2**20


def memcpy(src: mmap.mmap, dst: mmap.mmap, size: int) -> None:
    a = ctypes.addressof(ctypes.c_char.from_buffer(src))
    b = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    offsets = list(range(0, size, PIECE))

    def worker(mine: list[int]) -> None:
        for o in mine:
            ctypes.memmove(b + o, a + o, min(PIECE, size - o))

    threads = [threading.Thread(target=worker, args=(offsets[i::THREADS],)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def baseline(size: int, runs: int, faulted: bool) -> float:
    src = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    times = []
    for _ in range(runs):
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if faulted else 0)
        dst = mmap.mmap(-1, size, flags=flags)
        start = time.perf_counter()
        memcpy(src, dst, size)
        times.append(time.perf_counter() - start)
        dst.close()
    src.close()
    return sorted(times)[len(times) // 2]


async def torpor(path: str, root: str, runs: int) -> tuple[float, float, int]:
    backend = HostBackend(
        devices=1, device_capacity=4 * GiB, host_capacity=4 * GiB, copy_threads=THREADS
    )
    manager = ModelManager(backend, ManagerSettings(allowed_roots=(root,)))  # type: ignore[arg-type]
    wakes, offloads = [], []
    try:
        m = await manager.load("bench", path, target=Tier.HOST)
        for _ in range(runs):
            start = time.perf_counter()
            await manager.wake("bench")
            wakes.append(time.perf_counter() - start)
            await manager.offload("bench", [], Tier.HOST)
            start = time.perf_counter()
            await manager.offload("bench", [], Tier.DEVICE)
            offloads.append(time.perf_counter() - start)
            await manager.sleep("bench", 1)
        return sorted(wakes)[runs // 2], sorted(offloads)[runs // 2], m.total_bytes
    finally:
        await manager.close(1.0)
        backend.close()


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    from pathlib import Path

    path = big_checkpoint(args.dir)
    root = str(Path(args.dir).resolve())
    wake, offload, size = asyncio.run(torpor(str(path.resolve()), root, args.runs))
    fresh = baseline(size, args.runs, faulted=False)
    faulted = baseline(size, args.runs, faulted=True)
    print(f"Wake benchmark: {size / GiB:.2f} GiB, {THREADS} copy threads; {machine()}")
    print(row("memcpy, threads, into fresh memory", fresh, size))
    print(row("memcpy, threads, into faulted memory", faulted, size, fresh))
    print(row("torpor WakeModel from level 1", wake, size, fresh))
    print(row("torpor OffloadModel HOST -> DEVICE", offload, size, fresh))
    print(
        f"  => wake / memcpy: {fresh / wake:.2f}x; offload / memcpy: {fresh / offload:.2f}x"
        " (target >= 0.7)"
    )


if __name__ == "__main__":
    main()
