"""How the CUDA backend picks the way a chunk's pieces reach a device slab,
from what it measured: the pure choice, and the measurement taken once (the
measurement itself runs in tests/gpu)."""

from __future__ import annotations

import threading

from torpord.backends.cuda.methods import (
    SCATTER_MIN_PIECES,
    TransferMethods,
    choose_method,
    fastest,
    without,
)

KiB = 1024

MEASURED = [(4 * KiB, "kernel"), (16 * KiB, "batch"), (64 * KiB, "copies"), (256 * KiB, "batch")]


class Measure:
    """What a GPU might measure, counting how often it is asked."""

    def __init__(self, measured: list[tuple[int, str]] | Exception) -> None:
        self.measured = measured
        self.calls = 0

    def __call__(self) -> list[tuple[int, str]]:
        self.calls += 1
        if isinstance(self.measured, Exception):
            raise self.measured
        return list(self.measured)


def test_the_chunks_mean_piece_size_picks_what_was_fastest_there() -> None:
    many = SCATTER_MIN_PIECES
    assert choose_method(MEASURED, many, 1 * KiB, kernels=True) == "kernel"
    assert choose_method(MEASURED, many, 4 * KiB, kernels=True) == "kernel"
    assert choose_method(MEASURED, many, 5 * KiB, kernels=True) == "batch"
    assert choose_method(MEASURED, many, 64 * KiB, kernels=True) == "copies"
    assert choose_method(MEASURED, many, 100 * KiB, kernels=True) == "batch"
    # above: the largest measured
    assert choose_method(MEASURED, many, 8 << 20, kernels=True) == "batch"
    assert choose_method(MEASURED, many - 1, 1 * KiB, kernels=True) == "copies"  # too few
    assert choose_method([], many, 1 * KiB, kernels=True) == "copies"  # nothing measured


def test_the_device_is_measured_once_and_not_for_too_few_pieces() -> None:
    measure, methods = Measure(MEASURED), TransferMethods()
    assert methods.choose(SCATTER_MIN_PIECES - 1, KiB, kernels=True, measure=measure) == "copies"
    assert measure.calls == 0 and methods.measured is None
    for mean, expected in [(KiB, "kernel"), (5 * KiB, "batch"), (64 * KiB, "copies")]:
        chosen = methods.choose(SCATTER_MIN_PIECES, mean, kernels=True, measure=measure)
        assert chosen == expected
    assert measure.calls == 1  # measured once
    assert methods.measured == MEASURED


def test_one_measurement_however_many_workers_ask_at_once() -> None:
    measure, methods = Measure(MEASURED), TransferMethods()
    barrier = threading.Barrier(8)
    chosen: list[str] = []

    def worker() -> None:
        barrier.wait()
        chosen.append(methods.choose(SCATTER_MIN_PIECES, KiB, kernels=True, measure=measure))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert measure.calls == 1 and chosen == ["kernel"] * 8


def test_a_failed_measurement_means_copies_and_is_not_retried() -> None:
    measure, methods = Measure(RuntimeError("no NVRTC")), TransferMethods()
    assert methods.choose(64, KiB, kernels=True, measure=measure) == "copies"
    assert methods.choose(64, KiB, kernels=True, measure=measure) == "copies"
    assert measure.calls == 1 and methods.measured == []


def test_without_kernels_nothing_is_measured_and_the_kernel_is_never_chosen() -> None:
    measure, methods = Measure(MEASURED), TransferMethods()
    assert methods.choose(SCATTER_MIN_PIECES, KiB, kernels=False, measure=measure) == "copies"
    assert measure.calls == 0 and methods.measured == []
    # (measured before, or set by hand)
    measured = TransferMethods(MEASURED)
    assert measured.choose(SCATTER_MIN_PIECES, 4 * KiB, kernels=False, measure=measure) == "copies"
    assert measured.choose(SCATTER_MIN_PIECES, 16 * KiB, kernels=False, measure=measure) == "batch"
    assert measure.calls == 0
    assert choose_method(MEASURED, SCATTER_MIN_PIECES, 4 * KiB, kernels=False) == "copies"
    assert choose_method(MEASURED, SCATTER_MIN_PIECES, 16 * KiB, kernels=False) == "batch"


def test_a_method_that_failed_is_replaced_by_copies_from_then_on() -> None:
    methods = TransferMethods(MEASURED)
    methods.failed("batch")
    assert methods.measured == without(MEASURED, "batch")
    assert methods.measured == [
        (4 * KiB, "kernel"),
        (16 * KiB, "copies"),
        (64 * KiB, "copies"),
        (256 * KiB, "copies"),
    ]
    chosen = methods.choose(SCATTER_MIN_PIECES, 16 * KiB, kernels=True, measure=Measure([]))
    assert chosen == "copies"


def test_the_fastest_method_is_the_one_of_fewest_seconds() -> None:
    assert fastest({"copies": 3.0, "kernel": 1.5, "batch": 2.0}) == "kernel"
    assert fastest({"copies": 1.0}) == "copies"
