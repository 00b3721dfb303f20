"""The GPU benchmarks, each a ratio against a baseline measured in the same run.

    python -m tests.bench.bench_gpu --out DIR [--dir CKPT_DIR] [--runs N]

- Wake from level 1: the effective host-to-device GB/s of WakeModel over the
  machine's measured pinned `cudaMemcpyAsync` peak (target >= 0.9), and the
  time until the first layer is back with progressive wake.
- Load from the page cache: GB/s of LoadModel to the GPU against
  `safetensors.torch.load_file(..., device="cuda")` (target >= 3x).
- Gather/scatter of 1 000 segments of 4 KiB-1 MiB, device to device: the
  kernel against one `cudaMemcpyAsync` per segment and against the driver's
  `cuMemcpyBatchAsync` (CUDA >= 12.8).

Writes results.json and summary.txt to --out. Needs a GPU, cuda-bindings,
CuPy and a CUDA build of torch.
"""

from __future__ import annotations

import asyncio
import json
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torpord.cuda.kernels import best_seconds

from tests.bench.common import GiB, big_checkpoint, files_of, machine, parser, warm

MiB = 1 << 20


def h2d_peak(size: int, runs: int) -> float:
    """GB/s of one pinned host -> device cudaMemcpyAsync of `size` bytes."""
    import cupy

    host = cupy.cuda.alloc_pinned_memory(size)
    device = cupy.cuda.alloc(size)
    stream = cupy.cuda.Stream(non_blocking=True)

    def copy() -> None:
        cupy.cuda.runtime.memcpyAsync(device.ptr, host.ptr, size, 1, stream.ptr)

    return size / best_seconds(stream, copy, runs) / 1e9


class FirstLayer:
    """Engines stand-in that notes when the first layer of a wake is back."""

    def __init__(self) -> None:
        self.first: float | None = None

    def attached(self, model_id: str) -> int:
        return 1

    async def quiesce(self, model_id: str, layers: Sequence[str]) -> list[str]:
        return []

    def resume(self, model_id: str, layers: Sequence[str]) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def unloaded(self, model_id: str) -> None:
        pass


async def wake_and_load(path: Path, root: Path, runs: int) -> dict[str, float]:
    from torpord.backends.cuda import CudaBackend
    from torpord.core.manager import ManagerSettings, ModelManager
    from torpord.types import Tier

    backend = CudaBackend(device_capacity=0.8, host_capacity=8 * GiB, kernels="required")
    backend.prepare()  # (as the daemon does at start: the kernels, compiled now)
    manager = ModelManager(backend, ManagerSettings(allowed_roots=(root,)))  # type: ignore[arg-type]
    engines = FirstLayer()
    manager.use_engines(engines)
    wakes, firsts, loads = [], [], []
    try:
        warm(files_of(path))
        for _ in range(runs):  # from the page cache straight to the GPU
            start = time.perf_counter()
            m = await manager.load("bench", str(path))
            loads.append(time.perf_counter() - start)
            await manager.unload("bench")
        m = await manager.load("bench", str(path), target=Tier.HOST)
        for _ in range(runs):
            engines.first = None
            start = time.perf_counter()
            await manager.wake("bench")
            wakes.append(time.perf_counter() - start)
            assert engines.first is not None
            firsts.append(engines.first - start)
            await manager.sleep("bench", 1)
        size = m.total_bytes
    finally:
        await manager.close(1.0)
        backend.close()
    return {
        "bytes": size,
        "wake_s": min(wakes),
        "first_layer_s": min(firsts),
        "load_s": min(loads),
    }


def safetensors_load(path: Path, runs: int) -> float:
    import torch
    from safetensors.torch import load_file

    best = float("inf")
    files = files_of(path)
    for _ in range(runs):
        warm(files)
        start = time.perf_counter()
        tensors = [load_file(str(f), device="cuda") for f in files]
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        del tensors
    return best


def gather_scatter(runs: int) -> dict[str, Any]:
    import cupy
    from torpord.cuda.kernels import Kernels

    rng = np.random.default_rng(0)
    sizes = [int(s) & ~15 or 16 for s in np.exp(rng.uniform(np.log(4096), np.log(MiB), 1000))]
    total = sum(sizes)
    src = cupy.empty(total, dtype=cupy.uint8)
    dst = cupy.empty(total, dtype=cupy.uint8)
    order = rng.permutation(len(sizes))  # scatter: each segment elsewhere
    src_offsets = np.cumsum([0, *sizes[:-1]])
    dst_offsets = np.empty(len(sizes), dtype=np.int64)
    at = 0
    for i in order:
        dst_offsets[i] = at
        at += sizes[i]
    segments = [
        (int(s), int(d), n) for s, d, n in zip(src_offsets, dst_offsets, sizes, strict=True)
    ]
    kernels = Kernels()
    stream = cupy.cuda.Stream(non_blocking=True)
    out: dict[str, Any] = {"segments": len(segments), "bytes": total}

    def kernel() -> None:
        kernels.gather_scatter(src.data.ptr, dst.data.ptr, segments, stream=stream)

    def per_segment() -> None:
        for s, d, n in segments:
            cupy.cuda.runtime.memcpyAsync(dst.data.ptr + d, src.data.ptr + s, n, 3, stream.ptr)

    out["kernel_s"] = best_seconds(stream, kernel, runs)
    out["memcpy_per_segment_s"] = best_seconds(stream, per_segment, runs)
    try:
        from torpord.cuda.driver import memcpy_batch

        dsts = [dst.data.ptr + d for _, d, _ in segments]
        srcs = [src.data.ptr + s for s, _, _ in segments]
        lengths = [n for _, _, n in segments]

        def batch() -> None:
            memcpy_batch(dsts, srcs, lengths, stream.ptr)

        out["memcpy_batch_s"] = best_seconds(stream, batch, runs)
    except Exception as err:  # an older driver or bindings
        out["memcpy_batch_error"] = str(err)
    expected = np.zeros(total, dtype=np.uint8)
    from torpord.cuda.reference import gather_scatter as model

    model(cupy.asnumpy(src), expected, segments)
    kernel()
    stream.synchronize()
    out["kernel_correct"] = bool(np.array_equal(cupy.asnumpy(dst), expected))
    return out


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--out", type=Path, default=Path("gpu-results"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine()}
    lines = [f"GPU benchmarks; {machine()}"]

    def save() -> None:  # after every section: a later failure or timeout loses nothing
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        (args.out / "summary.txt").write_text("\n".join(lines) + "\n")

    def section(name: str, run: Callable[[], None]) -> None:
        try:
            run()
        except Exception as err:
            results[f"{name}_error"] = repr(err)
            lines.append(f"{name}: FAILED {err!r}")
            traceback.print_exc()
        save()
        print(lines[-1], flush=True)

    def peak() -> None:
        results["h2d_peak_gbs"] = h2d_peak(1 * GiB, args.runs)
        lines.append(f"pinned cudaMemcpyAsync H2D peak: {results['h2d_peak_gbs']:.1f} GB/s")

    def scatter() -> None:
        gs = gather_scatter(args.runs)
        results["gather_scatter"] = gs
        gb = gs["bytes"] / 1e9
        line = (
            f"gather/scatter {gs['segments']} segments, {gb * 1e3:.0f} MB: kernel"
            f" {gb / gs['kernel_s']:.1f} GB/s; per-segment memcpy"
            f" {gb / gs['memcpy_per_segment_s']:.1f} GB/s"
            f" ({gs['memcpy_per_segment_s'] / gs['kernel_s']:.2f}x)"
        )
        if "memcpy_batch_s" in gs:
            line += (
                f"; cuMemcpyBatchAsync {gb / gs['memcpy_batch_s']:.1f} GB/s"
                f" ({gs['memcpy_batch_s'] / gs['kernel_s']:.2f}x)"
            )
        else:
            line += f"; cuMemcpyBatchAsync unavailable: {gs['memcpy_batch_error']}"
        line += f"; kernel output correct: {gs['kernel_correct']}"
        lines.append(line)

    def wake() -> None:
        path = big_checkpoint(args.dir)
        torpor = asyncio.run(wake_and_load(path.resolve(), Path(args.dir).resolve(), args.runs))
        results["torpor"] = torpor
        size = torpor["bytes"]
        wake_gbs = size / torpor["wake_s"] / 1e9
        results["wake_gbs"] = wake_gbs
        peak = results.get("h2d_peak_gbs")
        over = f" = {wake_gbs / peak:.2f}x the H2D peak (target >= 0.9)" if peak else ""
        if peak:
            results["wake_over_peak"] = wake_gbs / peak
        lines.append(
            f"WakeModel level 1: {size / GiB:.2f} GiB in {torpor['wake_s'] * 1e3:.0f} ms ="
            f" {wake_gbs:.1f} GB/s{over}; first layer back after"
            f" {torpor['first_layer_s'] * 1e3:.1f} ms"
        )
        save()
        baseline = safetensors_load(path, args.runs)
        results["safetensors_load_s"] = baseline
        results["load_over_safetensors"] = baseline / torpor["load_s"]
        lines.append(
            f"LoadModel from page cache: {size / torpor['load_s'] / 1e9:.1f} GB/s vs"
            f" safetensors load_file(device='cuda') {size / baseline / 1e9:.1f} GB/s ="
            f" {baseline / torpor['load_s']:.2f}x (target >= 3x)"
        )

    section("h2d_peak", peak)
    section("gather_scatter", scatter)
    section("wake_and_load", wake)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
