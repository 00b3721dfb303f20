"""The figures of `torporctl stats`: quantiles as numpy computes them, and
the summary of a history per model and kind."""

from __future__ import annotations

import random

import numpy as np
import pytest
from torpord.core.acquire import Figure
from torpord.core.history import Finished, History
from torpord.core.model import TransitionRecord
from torpord.core.stats import Spread, Stats, quantile, summarise
from torpord.errors import InvalidArgument
from torpord.types import Outcome, TransitionKind

LOAD, SLEEP, WAKE = TransitionKind.LOAD, TransitionKind.SLEEP, TransitionKind.WAKE
OK, ROLLED_BACK, FAILED = Outcome.SUCCEEDED, Outcome.ROLLED_BACK, Outcome.FAILED
QS = (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)


def finished(
    model_id: str,
    kind: TransitionKind,
    outcome: Outcome = OK,
    duration: float = 1.0,
    nbytes: int = 0,
    start: float = 1000.0,
) -> Finished:
    return Finished(model_id, "HOST-0", 0, TransitionRecord(kind, outcome, start, duration, nbytes))


def stats(
    fs: list[Finished],
    acquires: tuple[Figure, ...] = (),
    *,
    model_id: str = "",
    kind: TransitionKind | None = None,
) -> Stats:
    return summarise(
        fs, acquires, transition_capacity=100, acquire_capacity=10, model_id=model_id, kind=kind
    )


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100, 1001])
def test_quantile_is_numpys_linear_percentile_on_random_samples(size: int) -> None:
    rng = random.Random(size)
    for scale in (1e-3, 1.0, 600.0):
        samples = sorted(rng.expovariate(1 / scale) for _ in range(size))
        for q in QS:
            assert quantile(samples, q) == pytest.approx(
                float(np.percentile(samples, q * 100)), rel=1e-12, abs=0
            )


def test_quantile_edge_cases() -> None:
    assert [quantile([0.25], q) for q in QS] == [0.25] * len(QS)  # one sample: itself
    same = [0.1] * 7
    assert [quantile(same, q) for q in QS] == [0.1] * len(QS)  # exactly, not 0.1000...01
    assert quantile([1.0, 2.0], 0.5) == 1.5 == float(np.percentile([1.0, 2.0], 50))
    assert quantile([0.0, 10.0], 0.99) == pytest.approx(9.9)
    with pytest.raises(ValueError, match="no samples"):
        quantile([], 0.5)
    for q in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match="outside"):
            quantile([1.0], q)


def test_quantiles_stay_between_neighbours_and_in_order() -> None:
    rng = random.Random(7)
    for _ in range(200):
        samples = sorted(rng.uniform(0, 1) ** 3 for _ in range(rng.randint(1, 50)))
        figures = [quantile(samples, q) for q in QS]
        assert figures == sorted(figures)
        assert samples[0] <= figures[0] and figures[-1] <= samples[-1]


def test_spread_of_durations() -> None:
    assert Spread.of([]) is None
    s = Spread.of([3.0, 1.0, 2.0, 4.0])
    assert s is not None
    assert (s.count, s.p50, s.mean, s.max) == (4, 2.5, 2.5, 4.0)
    assert s.p50 <= s.p95 <= s.p99 <= s.max
    assert (s.p95, s.p99) == (
        pytest.approx(float(np.percentile([1, 2, 3, 4], 95))),
        pytest.approx(float(np.percentile([1, 2, 3, 4], 99))),
    )


def test_counts_per_model_and_kind_and_overall_with_failures_apart() -> None:
    fs = [
        finished("a", LOAD, duration=2.0, nbytes=4000),
        finished("b", LOAD, duration=1.0, nbytes=1000),
        finished("a", SLEEP, duration=0.5, nbytes=2000, start=900.0),
        finished("a", WAKE, ROLLED_BACK, duration=9.0, nbytes=123),
        finished("a", WAKE, duration=0.25, nbytes=1000),
        finished("b", WAKE, FAILED, duration=7.0),
    ]
    got = stats(fs)
    rows = {(r.model_id, r.kind): r for r in got.transitions}
    assert list(rows) == [
        ("", LOAD), ("", SLEEP), ("", WAKE),
        ("a", LOAD), ("a", SLEEP), ("a", WAKE),
        ("b", LOAD), ("b", WAKE),
    ]  # fmt: skip
    overall_wake = rows["", WAKE]
    assert (overall_wake.count, overall_wake.succeeded, overall_wake.failed) == (3, 1, 2)
    # Durations and bytes are the succeeded ones' only.
    assert overall_wake.duration == Spread(1, 0.25, 0.25, 0.25, 0.25, 0.25)
    assert (overall_wake.bytes, overall_wake.median_bytes_per_second) == (1000, 4000.0)
    b_wake = rows["b", WAKE]
    assert (b_wake.count, b_wake.failed, b_wake.duration, b_wake.bytes) == (1, 1, None, 0)
    assert b_wake.median_bytes_per_second == 0.0
    loads = rows["", LOAD]
    assert loads.duration is not None and (loads.count, loads.duration.p50) == (2, 1.5)
    assert (loads.bytes, loads.median_bytes_per_second) == (5000, 1500.0)  # of 2000 and 1000
    assert got.window.start_time == 900.0  # the earliest start, not the first kept
    assert (got.window.transitions, got.window.transitions_truncated) == (6, False)


def test_filters_by_model_and_kind() -> None:
    fs = [finished("a", LOAD), finished("b", LOAD), finished("a", WAKE), finished("b", SLEEP)]
    acquires = (Figure("a", True, 0.001), Figure("b", False, 2.0), Figure("a", False, 1.0))
    only_a = stats(fs, acquires, model_id="a")
    assert [(r.model_id, r.kind) for r in only_a.transitions] == [("a", LOAD), ("a", WAKE)]
    assert [(r.model_id, r.count, r.hits) for r in only_a.acquires] == [("a", 2, 1)]
    loads = stats(fs, acquires, kind=LOAD)
    assert [(r.model_id, r.kind) for r in loads.transitions] == [
        ("", LOAD),
        ("a", LOAD),
        ("b", LOAD),
    ]
    assert loads.acquires == ()  # a kind asked for: transitions only
    both = stats(fs, acquires, model_id="b", kind=SLEEP)
    assert [(r.model_id, r.kind, r.count) for r in both.transitions] == [("b", SLEEP, 1)]
    # The window is the whole history's, whatever the filters.
    assert both.window.transitions == 4 and both.window.acquires == 3


def test_acquires_hit_count_and_time_to_ready() -> None:
    acquires = (Figure("a", True, 0.001), Figure("b", False, 3.0), Figure("a", False, 1.0))
    got = stats([], acquires)
    assert [(r.model_id, r.count, r.hits) for r in got.acquires] == [
        ("", 3, 1),
        ("a", 2, 1),
        ("b", 1, 0),
    ]
    overall = got.acquires[0].time_to_ready
    assert overall is not None and (overall.p50, overall.max) == (1.0, 3.0)
    assert got.transitions == () and got.window.start_time is None


def test_a_model_without_history_gets_empty_figures_and_a_bad_id_is_refused() -> None:
    got = stats([finished("a", LOAD)], (Figure("a", True, 0.1),), model_id="gone")
    assert (got.transitions, got.acquires) == ((), ())
    assert got.window.transitions == 1
    assert stats([]).transitions == () and stats([]).acquires == ()
    for bad in ("../etc", "a" * 129, "-x", "a b"):
        with pytest.raises(InvalidArgument) as err:
            stats([], model_id=bad)
        assert err.value.reason == "INVALID_MODEL_ID"


def test_a_full_ring_says_older_transitions_were_let_go() -> None:
    history = History(size=3)
    assert history.capacity == 3
    for i in range(5):
        history.add(finished("a", LOAD, start=float(i)))
    got = summarise(history.recent(), (), transition_capacity=history.capacity, acquire_capacity=10)
    assert (got.window.transitions, got.window.transitions_truncated) == (3, True)
    assert got.window.start_time == 2.0  # the oldest kept
    assert got.transitions[0].count == 3
    full = summarise([], [Figure("a", True, 0.0)] * 2, transition_capacity=3, acquire_capacity=2)
    assert full.window.acquires_truncated and not full.window.transitions_truncated
