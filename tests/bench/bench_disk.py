"""Offload to DISK and back, against writing and reading the same bytes with plain file I/O.

    python -m tests.bench.bench_disk [--dir DIR] [--runs N]

The ~2.2 GiB model is loaded, offloaded to the disk cache (atomic entries:
temporary file, fsync, rename) and brought back to the device with the cache
files dropped from the page cache first. Baselines, in the same run and the
same directory: one file per layer written with os.write + fsync, and read
back with plain reads into a fresh buffer after the same eviction.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import shutil
import time
from pathlib import Path

from torpord.backends.host import HostBackend
from torpord.core.manager import ManagerSettings, ModelManager
from torpord.storage.diskcache import DiskCache
from torpord.types import Tier

from tests.bench.common import GiB, big_checkpoint, evict, machine, parser, row


async def torpor(path: Path, root: Path, cache: Path, runs: int) -> tuple[float, float, int]:
    backend = HostBackend(devices=1, device_capacity=4 * GiB, host_capacity=GiB)
    disk = DiskCache(cache, 8 * GiB)
    manager = ModelManager(backend, ManagerSettings(allowed_roots=(root,)), disk=disk)
    outs, ins = [], []
    try:
        m = await manager.load("bench", str(path))
        for _ in range(runs):
            for entry in list(disk._entries.values()):  # a fresh write each run
                disk.remove(entry)
            for layer in manager.registry.models["bench"].layers:
                layer.disk = None
            start = time.perf_counter()
            await manager.offload("bench", [], Tier.DISK)
            outs.append(time.perf_counter() - start)
            evict(sorted(cache.glob("*/*.slab")))
            start = time.perf_counter()
            await manager.offload("bench", [], Tier.DEVICE)
            ins.append(time.perf_counter() - start)
        return sorted(outs)[runs // 2], sorted(ins)[runs // 2], m.total_bytes
    finally:
        await manager.close(1.0)
        backend.close()


def plain(folder: Path, sizes: list[int], runs: int) -> tuple[float, float]:
    src = mmap.mmap(-1, max(sizes), flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    outs, ins = [], []
    for _ in range(runs):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        start = time.perf_counter()
        for i, size in enumerate(sizes):
            fd = os.open(folder / f"{i}", os.O_WRONLY | os.O_CREAT, 0o600)
            with memoryview(src)[:size] as data:
                done = 0
                while done < size:
                    with data[done:] as rest:
                        done += os.write(fd, rest)
            os.fsync(fd)
            os.close(fd)
        outs.append(time.perf_counter() - start)
        files = sorted(folder.iterdir())
        evict(files)
        start = time.perf_counter()
        for f, size in zip(files, sizes, strict=True):
            dst = mmap.mmap(-1, size)
            fd = os.open(f, os.O_RDONLY)
            with memoryview(dst) as view:
                os.preadv(fd, [view], 0)
            os.close(fd)
            dst.close()
        ins.append(time.perf_counter() - start)
    src.close()
    shutil.rmtree(folder, ignore_errors=True)
    return sorted(outs)[runs // 2], sorted(ins)[runs // 2]


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    path = big_checkpoint(args.dir).resolve()
    root = Path(args.dir).resolve()
    cache = root / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    out, back, total = asyncio.run(torpor(path, root, cache, args.runs))
    shutil.rmtree(cache, ignore_errors=True)
    # The same layer sizes, written and read plainly.
    from torpord.storage.checkpoint import open_checkpoint
    from torpord.storage.layers import plan_layers

    sizes = [p.size for p in plan_layers(open_checkpoint(path))]
    w, r = plain(root / "plain", sizes, args.runs)
    print(f"Disk tier: {total / GiB:.2f} GiB in {len(sizes)} layers; {machine()}")
    print(row("plain write + fsync, a file per layer", w, total))
    print(row("torpor OffloadModel -> DISK", out, total, w))
    print(row("plain read, page cache cold", r, total))
    print(row("torpor OffloadModel DISK -> DEVICE (verified)", back, total, r))


if __name__ == "__main__":
    main()
