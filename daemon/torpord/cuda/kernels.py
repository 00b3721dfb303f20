"""The custom CUDA kernels: sources in `cuda_kernels/` (at the top of a source
checkout; installed as `torpord/cuda_kernels/`), compiled at run time with
CuPy's RawModule (NVRTC) for the GPU at hand, the compiled code
cached on disk (CuPy's kernel cache, in the directory given to `Kernels`).

Importing this module needs neither CuPy nor a GPU; building `Kernels` does.
The NumPy models in torpord.cuda.reference say what each kernel computes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from torpord.cuda.reference import Segment, pieces
from torpord.storage.checksum import CHUNK, combine

__all__ = ["KERNELS", "Kernels", "best_seconds", "source", "sources_dir"]

PACKAGE = Path(__file__).resolve().parent.parent  # torpord
# Each source file and the kernels it defines.
KERNELS = {
    "checksum.cu": ("torpor_xxh3_chunks",),
    "gather_scatter.cu": ("torpor_gather_scatter",),
}
THREADS = 256
OPTIONS = ("-std=c++17",)


def sources_dir(package: Path = PACKAGE) -> Path:
    """The directory of the kernels' sources for the torpord package at
    `package`: inside it where it is installed (the wheel puts them in
    torpord/cuda_kernels), else, in a source checkout (<repo>/daemon/torpord),
    the repository's top-level cuda_kernels/. Only a directory that holds
    every source counts."""
    candidates = [package / "cuda_kernels"]
    if package.parent.name == "daemon":
        candidates.append(package.parent.parent / "cuda_kernels")
    for candidate in candidates:
        if all((candidate / name).is_file() for name in KERNELS):
            return candidate
    raise FileNotFoundError(
        f"the CUDA kernels' sources ({', '.join(KERNELS)}) are in none of"
        f" {', '.join(str(c) for c in candidates)}"
    )


def source(name: str) -> str:
    return (sources_dir() / name).read_text()


def best_seconds(stream: Any, fn: Callable[[], object], runs: int = 3) -> float:
    """Seconds of the GPU work fn queues on `stream` (a CuPy stream), timed
    with events: the best of `runs` after one warm-up."""
    import cupy

    fn()
    best = float("inf")
    for _ in range(runs):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return best


class Kernels:
    """The kernels, compiled for the current device. Not thread-safe per
    stream: callers pass the stream each launch runs on."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            # CuPy reads it at each compile: compiled kernels survive restarts.
            os.environ["CUPY_CACHE_DIR"] = str(cache_dir)
        import cupy

        self._cp: Any = cupy
        self._functions: dict[str, Any] = {}
        for name, kernels in KERNELS.items():
            module = cupy.RawModule(code=source(name), options=OPTIONS)
            for kernel in kernels:
                self._functions[kernel] = module.get_function(kernel)

    def chunk_digests(self, address: int, length: int, stream: Any = None) -> list[int]:
        """The XXH3-64 of each 1 MiB chunk of `length` bytes of device memory
        at `address` (8-byte aligned): what torpord.storage.checksum combines."""
        cp = self._cp
        count = -(-length // CHUNK)
        if count == 0:
            return []
        with stream or cp.cuda.get_current_stream():
            digests = cp.empty(count, dtype=cp.uint64)
            self._functions["torpor_xxh3_chunks"](
                (count,),
                (THREADS,),
                (np.uint64(address), np.uint64(length), np.uint64(CHUNK), digests),
            )
            host = digests.get()  # waits for the kernel
        return [int(d) for d in host]

    def checksum(self, address: int, length: int, stream: Any = None) -> str:
        """torpord.storage.checksum.slab_checksum of device memory, on the GPU."""
        return combine(self.chunk_digests(address, length, stream))

    def gather_scatter(
        self, src: int, dst: int, segments: Sequence[Segment], stream: Any = None
    ) -> None:
        """Copy each (source offset, destination offset, length) of the buffer
        at `src` to the one at `dst` in one launch (device or mapped pinned
        addresses; destinations must not overlap). Asynchronous on `stream`."""
        work = pieces(segments)
        if not work:
            return
        cp = self._cp
        table = np.array(work, dtype=np.uint64).reshape(-1, 3)
        table[:, 0] += np.uint64(src)
        table[:, 1] += np.uint64(dst)
        with stream or cp.cuda.get_current_stream():
            # (Freed arrays go back to CuPy's pool for this stream: reused
            # only by work queued after this launch.)
            srcs, dsts, lengths = (cp.asarray(np.ascontiguousarray(table[:, i])) for i in range(3))
            blocks = min(len(work), 4 * 132)  # enough to fill any current GPU
            self._functions["torpor_gather_scatter"](
                (blocks,), (THREADS,), (srcs, dsts, lengths, np.uint64(len(work)))
            )
