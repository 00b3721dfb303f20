"""How the CUDA backend picks the way a chunk's pieces reach a device slab,
from what it measured (the measurement itself runs in tests/gpu)."""

from __future__ import annotations

import threading

from torpord.backends.base import Budget
from torpord.backends.cuda import SCATTER_MIN_PIECES, CudaBackend, _Device

KiB = 1024


class Measuring(CudaBackend):
    """Only the choice: no driver; `_measure` returns what a GPU might."""

    def __init__(self, measured: list[tuple[int, str]] | Exception) -> None:
        self.measured = measured
        self.calls = 0

    def _measure(self, dev: _Device) -> list[tuple[int, str]]:
        self.calls += 1
        if isinstance(self.measured, Exception):
            raise self.measured
        return list(self.measured)


def device() -> _Device:
    return _Device("GPU-0", 0, "test", Budget("device GPU-0", 1 << 30))


MEASURED = [(4 * KiB, "kernel"), (16 * KiB, "batch"), (64 * KiB, "copies"), (256 * KiB, "batch")]


def test_the_chunks_mean_piece_size_picks_what_was_fastest_there() -> None:
    backend, dev = Measuring(MEASURED), device()
    many = SCATTER_MIN_PIECES
    assert backend._method(dev, many, 1 * KiB) == "kernel"
    assert backend._method(dev, many, 4 * KiB) == "kernel"
    assert backend._method(dev, many, 5 * KiB) == "batch"
    assert backend._method(dev, many, 64 * KiB) == "copies"
    assert backend._method(dev, many, 100 * KiB) == "batch"
    assert backend._method(dev, many, 8 << 20) == "batch"  # above: the largest measured
    assert backend._method(dev, many - 1, 1 * KiB) == "copies"  # too few to batch
    assert backend.calls == 1  # measured once


def test_one_measurement_however_many_workers_ask_at_once() -> None:
    backend, dev = Measuring(MEASURED), device()
    barrier = threading.Barrier(8)
    chosen: list[str] = []

    def worker() -> None:
        barrier.wait()
        chosen.append(backend._method(dev, SCATTER_MIN_PIECES, KiB))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backend.calls == 1 and chosen == ["kernel"] * 8


def test_a_failed_measurement_means_copies_and_is_not_retried() -> None:
    backend, dev = Measuring(RuntimeError("no NVRTC")), device()
    assert backend._method(dev, 64, KiB) == "copies"
    assert backend._method(dev, 64, KiB) == "copies"
    assert backend.calls == 1


def test_without_kernels_nothing_is_measured_and_the_kernel_is_never_chosen() -> None:
    backend, dev = Measuring(MEASURED), device()
    backend.kernels_unavailable = "ModuleNotFoundError: No module named 'cupy'"
    assert backend._method(dev, SCATTER_MIN_PIECES, KiB) == "copies"
    assert backend.calls == 0 and dev.methods == []
    dev.methods = list(MEASURED)  # (measured before, or set by hand)
    assert backend._method(dev, SCATTER_MIN_PIECES, 4 * KiB) == "copies"  # not "kernel"
    assert backend._method(dev, SCATTER_MIN_PIECES, 16 * KiB) == "batch"  # needs no CuPy
