"""Timeline: wall time is the union of workers' intervals, busy time their sum."""

from __future__ import annotations

import pytest
from torpord.timeline import MAX_SPANS, Timeline


def test_overlapping_workers_count_once_in_wall_time() -> None:
    t = Timeline()
    for start in (0.0, 0.5, 1.0, 1.5):  # four workers, each 2 s, staggered
        t.add(start, start + 2.0)
    t.add(10.0, 11.0)  # later, alone
    assert t.spans() == [(0.0, 3.5), (10.0, 11.0)]
    assert t.wall == pytest.approx(4.5)
    assert t.busy == pytest.approx(9.0)


def test_touching_and_nested_intervals_merge() -> None:
    t = Timeline()
    t.add(5.0, 6.0)
    t.add(1.0, 2.0)
    t.add(2.0, 3.0)  # touches the one before
    t.add(1.5, 1.6)  # inside
    t.add(0.0, 10.0)  # covers everything
    assert t.spans() == [(0.0, 10.0)]
    assert t.busy == pytest.approx(1.0 + 1.0 + 1.0 + 0.1 + 10.0)


def test_empty_and_reversed_intervals_count_nothing() -> None:
    t = Timeline()
    t.add(3.0, 3.0)
    t.add(4.0, 2.0)
    assert t.spans() == [] and t.wall == 0 and t.busy == 0


def test_update_folds_in_other_workers() -> None:
    a, b = Timeline.of(0.0, 2.0), Timeline.of(1.0, 3.0)
    b.add(5.0, 6.0)
    a.update(b)
    assert a.spans() == [(0.0, 3.0), (5.0, 6.0)]
    assert (a.wall, a.busy) == pytest.approx((4.0, 5.0))


def test_spans_stay_bounded_and_wall_stays_within_the_whole() -> None:
    # One worker alternating with something else: a gap after every interval.
    t = Timeline()
    n = 5 * MAX_SPANS
    for i in range(n):
        t.add(float(i), i + 0.5)
    assert len(t.spans()) <= MAX_SPANS
    assert t.busy == pytest.approx(n * 0.5)
    assert n * 0.5 <= t.wall <= n - 0.5  # closed gaps may count; nothing outside
    assert t.spans()[0][0] == 0.0 and t.spans()[-1][1] == n - 0.5
