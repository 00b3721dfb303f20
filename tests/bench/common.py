"""Shared pieces of the benchmarks: a big checkpoint, page-cache eviction, timing.

Every benchmark prints its figures as ratios against a baseline measured in
the same run (these machines are shared and noisy); nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from torpor.testing import make_checkpoint

GiB = 2**30

# 24 blocks of a hidden-2048 llama in F16, 4 shards: about 2.2 GiB.
BIG = {"layers": 24, "hidden": 2048, "vocab": 32000, "shards": 4}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("TORPOR_BENCH_DIR", "/var/tmp/torpor-bench")),
        help="where the generated checkpoint is kept between runs",
    )
    p.add_argument("--runs", type=int, default=3, help="runs of each measurement (median kept)")
    return p


def big_checkpoint(root: Path) -> Path:
    """The benchmark checkpoint, generated once and kept (same seed, same bytes)."""
    path = root / "llama-2g"
    marker = path / ".complete"
    if not marker.exists():
        print(f"generating a ~2.2 GiB checkpoint in {path} (once)...", flush=True)
        make_checkpoint(path, seed=1, **BIG)  # type: ignore[arg-type]
        marker.touch()
    return path


def files_of(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def evict(files: list[Path]) -> None:
    """Drop the files from the page cache (no root needed: fsync, then DONTNEED)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 * 2**20):
                pass


def median_seconds(fn: Callable[[], object], runs: int, before: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def private_memory() -> int:
    """This process's private resident memory, in bytes."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def machine() -> str:
    cpus = os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return f"{platform.machine()}, {cpus} CPUs, {mem:.0f} GiB RAM, Linux {platform.release()}"


def row(name: str, seconds: float, nbytes: int, baseline: float | None = None) -> str:
    rate = nbytes / seconds / 1e9
    ratio = f"{baseline / seconds:6.2f}x" if baseline else "  (base)"
    return f"  {name:<44} {seconds * 1e3:9.1f} ms  {rate:6.2f} GB/s  {ratio}"
