"""Activity: windows at their boundaries, weekly decay, reporters, bounds."""

from __future__ import annotations

import math

import pytest
from torpord.policies.activity import MAX_REPORTERS, WEEKLY_HALF_LIFE, Activity

MONDAY = 4 * 86400.0  # 1970-01-05 00:00 UTC, a Monday
HOUR = 3600.0
WEEK = 7 * 86400.0
T = MONDAY + 1000.0  # a clock for the lease tests


def test_nothing_recorded() -> None:
    summary = Activity().summary(1000.0)
    assert summary.last_use == 0.0
    assert summary.in_use == 0
    assert summary.uses == 0
    assert summary.busy_seconds == 0.0
    assert dict(summary.recent) == {60.0: 0, 3600.0: 0, 86400.0: 0}
    assert summary.weekly == ()


def test_record_adds_uses_busy_time_and_last_use() -> None:
    activity = Activity()
    activity.record(100.0, "a", uses=3, busy_seconds=1.5, in_use=0)
    activity.record(101.0, "b", uses=2, busy_seconds=0.5, in_use=0)
    summary = activity.summary(102.0)
    assert summary.uses == 5
    assert summary.busy_seconds == 2.0
    assert summary.last_use == 101.0
    assert dict(summary.recent) == {60.0: 5, 3600.0: 5, 86400.0: 5}


def test_minute_window_boundary() -> None:
    activity = Activity()
    activity.record(10.5, "a", uses=1, busy_seconds=0.1, in_use=0)
    assert activity.summary(69.999).recent[60.0] == 1
    assert activity.summary(70.0).recent[60.0] == 0
    # Still in the longer windows.
    assert activity.summary(70.0).recent[3600.0] == 1


def test_hour_and_day_window_boundaries() -> None:
    activity = Activity()
    activity.record(120.0, "a", uses=2, busy_seconds=0.0, in_use=0)
    assert activity.summary(120.0 + HOUR - 0.001).recent[3600.0] == 2
    assert activity.summary(120.0 + HOUR).recent[3600.0] == 0
    # The day's buckets are 15 minutes wide: 120 s lies in bucket [0, 900).
    assert activity.summary(86400.0 + 899.0).recent[86400.0] == 0
    activity = Activity()
    activity.record(120.0, "a", uses=2, busy_seconds=0.0, in_use=0)
    assert activity.summary(86399.0).recent[86400.0] == 2
    assert activity.summary(86400.0).recent[86400.0] == 0
    assert activity.summary(86400.0).uses == 2  # the total stays


def test_windows_drop_old_uses_but_keep_new_ones() -> None:
    activity = Activity()
    for second in range(0, 120):
        activity.record(float(second), "a", uses=1, busy_seconds=0.0, in_use=0)
    summary = activity.summary(119.5)
    assert summary.recent[60.0] == 60  # seconds 60..119
    assert summary.recent[3600.0] == 120
    assert summary.uses == 120


def test_a_long_gap_clears_every_window() -> None:
    activity = Activity()
    activity.record(5.0, "a", uses=7, busy_seconds=0.0, in_use=0)
    activity.record(5.0 + 10 * 86400.0, "a", uses=1, busy_seconds=0.0, in_use=0)
    assert dict(activity.summary(5.0 + 10 * 86400.0).recent) == {60.0: 1, 3600.0: 1, 86400.0: 1}


def test_a_clock_that_goes_back_counts_in_the_newest_bucket() -> None:
    activity = Activity()
    activity.record(100.0, "a", uses=1, busy_seconds=0.0, in_use=0)
    activity.record(50.0, "a", uses=1, busy_seconds=0.0, in_use=0)
    summary = activity.summary(100.0)
    assert summary.recent[60.0] == 2
    assert summary.last_use == 100.0  # never moves back
    assert activity.summary(160.0).recent[60.0] == 0


def test_in_use_replaces_each_reporters_last_value_and_sums() -> None:
    activity = Activity()
    activity.record(1.0, "a", uses=0, busy_seconds=0.0, in_use=2)
    activity.record(1.0, "b", uses=0, busy_seconds=0.0, in_use=3)
    assert activity.summary(1.0).in_use == 5
    activity.record(2.0, "a", uses=2, busy_seconds=1.0, in_use=1)
    assert activity.summary(2.0).in_use == 4
    activity.record(3.0, "b", uses=3, busy_seconds=1.0, in_use=0)
    assert activity.summary(3.0).in_use == 1
    assert activity.reporters == 1


def test_last_use_moves_when_a_use_begins_or_ends() -> None:
    activity = Activity()
    activity.record(10.0, "a", uses=0, busy_seconds=0.0, in_use=1)  # began
    assert activity.summary(10.0).last_use == 10.0
    activity.record(20.0, "a", uses=1, busy_seconds=10.0, in_use=0)  # ended
    assert activity.summary(20.0).last_use == 20.0
    activity.record(30.0, "a", uses=0, busy_seconds=0.0, in_use=0)  # nothing
    assert activity.summary(30.0).last_use == 20.0


def test_forget_ends_a_reporters_open_uses() -> None:
    activity = Activity()
    activity.record(1.0, "engine", uses=0, busy_seconds=0.0, in_use=2)
    activity.record(1.0, "router", uses=0, busy_seconds=0.0, in_use=1)
    activity.forget(5.0, "engine")
    summary = activity.summary(5.0)
    assert summary.in_use == 1
    assert summary.last_use == 5.0
    activity.forget(6.0, "engine")  # twice: nothing more
    activity.forget(6.0, "nobody")
    assert activity.summary(6.0).in_use == 1
    assert activity.summary(6.0).last_use == 5.0


def test_reporters_with_uses_open_are_bounded() -> None:
    activity = Activity()
    for number in range(MAX_REPORTERS + 10):
        activity.record(float(number), f"r{number}", uses=0, busy_seconds=0.0, in_use=1)
    assert activity.reporters == MAX_REPORTERS
    assert activity.summary(100.0).in_use == MAX_REPORTERS
    # The least recently reporting were dropped: r0..r9; r10 still counts.
    activity.record(101.0, "r10", uses=0, busy_seconds=0.0, in_use=0)
    assert activity.summary(101.0).in_use == MAX_REPORTERS - 1
    activity.record(101.0, "r0", uses=0, busy_seconds=0.0, in_use=0)
    assert activity.summary(101.0).in_use == MAX_REPORTERS - 1


def test_a_report_refreshes_a_reporters_place() -> None:
    activity = Activity()
    for number in range(MAX_REPORTERS):
        activity.record(0.0, f"r{number}", uses=0, busy_seconds=0.0, in_use=1)
    activity.record(1.0, "r0", uses=0, busy_seconds=0.0, in_use=4)  # r0 now newest
    activity.record(2.0, "new", uses=0, busy_seconds=0.0, in_use=1)  # drops r1
    assert activity.summary(2.0).in_use == MAX_REPORTERS - 1 + 4
    activity.record(3.0, "r0", uses=0, busy_seconds=0.0, in_use=0)
    assert activity.summary(3.0).in_use == MAX_REPORTERS - 1


def test_weekly_bins_by_hour_of_week_from_monday_utc() -> None:
    activity = Activity()
    activity.record(MONDAY + 30.0, "a", uses=2, busy_seconds=0.0, in_use=0)
    activity.record(MONDAY + 2 * 86400.0 + 5 * HOUR + 10.0, "a", uses=3, busy_seconds=0.0, in_use=0)
    weekly = activity.summary(MONDAY + 2 * 86400.0 + 5 * HOUR + 20.0).weekly
    assert len(weekly) == 168
    decay = 0.5 ** ((2 * 24 + 5) * HOUR / WEEKLY_HALF_LIFE)
    assert weekly[0] == pytest.approx(2 * decay)
    assert weekly[2 * 24 + 5] == 3.0  # Wednesday 05:00, this hour: undecayed
    assert sum(weekly) == pytest.approx(2 * decay + 3)
    # The epoch itself (a Thursday) lands in Thursday 00:00.
    epoch = Activity()
    epoch.record(0.0, "a", uses=1, busy_seconds=0.0, in_use=0)
    assert epoch.summary(0.0).weekly[3 * 24] == 1.0


def test_weekly_weights_halve_each_week() -> None:
    activity = Activity()
    activity.record(MONDAY + 10 * HOUR, "a", uses=8, busy_seconds=0.0, in_use=0)
    assert activity.summary(MONDAY + 10 * HOUR + 3599.0).weekly[10] == 8.0
    assert activity.summary(MONDAY + 10 * HOUR + WEEK).weekly[10] == pytest.approx(4.0)
    # The same hour a week later: last week's 4 plus this week's 8.
    activity.record(MONDAY + 10 * HOUR + WEEK, "a", uses=8, busy_seconds=0.0, in_use=0)
    assert activity.summary(MONDAY + 10 * HOUR + WEEK).weekly[10] == pytest.approx(12.0)
    assert activity.summary(MONDAY + 10 * HOUR + 3 * WEEK).weekly[10] == pytest.approx(3.0)


def test_weekly_survives_a_very_long_gap() -> None:
    activity = Activity()
    activity.record(MONDAY, "a", uses=1, busy_seconds=0.0, in_use=0)
    weekly = activity.summary(MONDAY + 10_000 * WEEK).weekly
    assert len(weekly) == 168
    assert all(math.isfinite(count) and count >= 0.0 for count in weekly)
    assert weekly[0] < 1e-300


def test_summary_is_a_frozen_copy() -> None:
    activity = Activity()
    activity.record(MONDAY, "a", uses=1, busy_seconds=0.0, in_use=0)
    first = activity.summary(MONDAY)
    activity.record(MONDAY + 1.0, "a", uses=5, busy_seconds=0.0, in_use=0)
    assert first.uses == 1
    assert first.recent[60.0] == 1
    assert first.weekly[0] == 1.0


@pytest.mark.parametrize(
    ("uses", "busy", "in_use"),
    [(-1, 0.0, 0), (0, -0.5, 0), (0, 0.0, -1), (0, math.nan, 0), (0, math.inf, 0)],
)
def test_bad_counts_are_refused_and_change_nothing(uses: int, busy: float, in_use: int) -> None:
    activity = Activity()
    activity.record(1.0, "a", uses=1, busy_seconds=1.0, in_use=1)
    with pytest.raises(ValueError):
        activity.record(2.0, "a", uses=uses, busy_seconds=busy, in_use=in_use)
    summary = activity.summary(2.0)
    assert (summary.uses, summary.busy_seconds, summary.in_use) == (1, 1.0, 1)


def test_a_non_finite_clock_is_refused() -> None:
    activity = Activity()
    for now in (math.nan, math.inf):
        with pytest.raises(ValueError):
            activity.record(now, "a", uses=1, busy_seconds=0.0, in_use=0)
        with pytest.raises(ValueError):
            activity.summary(now)


def test_open_uses_with_a_lease_end_when_it_runs_out_unless_refreshed() -> None:
    a = Activity()
    a.record(T, "router", 0, 0.0, 2, open_until=T + 60)
    a.record(T, "engine", 0, 0.0, 1)  # no lease: open until forgotten
    assert a.summary(T + 59.9).in_use == 3
    gone = a.summary(T + 60)
    assert (gone.in_use, gone.last_use) == (1, T + 60)  # the router's ended at its lease's end
    a.record(T + 100, "router", 0, 0.0, 1, open_until=T + 160)
    a.record(T + 150, "router", 1, 0.5, 1, open_until=T + 210)  # refreshed
    assert a.summary(T + 200).in_use == 2
    a.record(T + 205, "router", 0, 0.0, 0, open_until=T + 265)  # closed: nothing to expire
    assert a.summary(T + 1000).in_use == 1
    assert a.summary(T + 1000).last_use == T + 205


def test_a_report_without_a_lease_drops_the_old_one() -> None:
    a = Activity()
    a.record(T, "r", 0, 0.0, 1, open_until=T + 10)
    a.record(T + 5, "r", 0, 0.0, 1)
    assert a.summary(T + 100).in_use == 1
    with pytest.raises(ValueError):
        a.record(T, "r", 0, 0.0, 1, open_until=math.inf)
