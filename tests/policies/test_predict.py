"""predict.py: expected uses from activity, and the weekly clock."""

from __future__ import annotations

import pytest
from torpord.policies.predict import (
    FLOOR,
    HORIZON,
    WEEK,
    expected_uses,
    hour_of_week,
    week_seconds,
    weekly_uses,
)

from tests.policies.build import activity

MONDAY = 4 * 86400.0  # 1970-01-05 00:00 UTC, a Monday


def test_the_week_starts_on_monday_utc() -> None:
    assert week_seconds(0.0) == 72 * 3600  # a Thursday
    assert week_seconds(MONDAY) == 0
    assert hour_of_week(MONDAY + 3599) == 0
    assert hour_of_week(MONDAY + 3600) == 1
    assert hour_of_week(MONDAY - 1) == 167
    assert week_seconds(MONDAY + 52 * WEEK + 10) == 10


def test_a_model_never_used_predicts_the_floor() -> None:
    assert expected_uses(activity(), MONDAY) == FLOOR


def test_a_steady_rate_predicts_that_rate() -> None:
    steady = activity(recent={60.0: 1, 3600.0: 60, 86400.0: 1440})  # one a minute
    assert expected_uses(steady, MONDAY) == pytest.approx(60.0)
    assert expected_uses(steady, MONDAY, horizon=600) == pytest.approx(10.0)


def test_a_burst_counts_more_than_old_uses() -> None:
    burst = activity(recent={60.0: 5, 3600.0: 5, 86400.0: 5})
    old = activity(recent={60.0: 0, 3600.0: 0, 86400.0: 5})
    assert expected_uses(burst, MONDAY) > 10 * expected_uses(old, MONDAY)


def test_one_stray_use_an_hour_ago_predicts_less_than_one() -> None:
    stray = activity(recent={60.0: 0, 3600.0: 1, 86400.0: 1})
    assert FLOOR < expected_uses(stray, MONDAY) < 1.0


def test_weekly_counts_cover_the_hours_the_horizon_covers() -> None:
    bins = [0.0] * 168
    bins[10] = 20.0  # a steady 10 uses in Monday's 10:00-11:00
    at = MONDAY + 9.5 * 3600  # half an hour before it
    assert weekly_uses(activity(weekly=bins), at, HORIZON) == pytest.approx(5.0)
    assert expected_uses(activity(weekly=bins), at) == pytest.approx(5.0)
    assert weekly_uses(activity(weekly=bins), MONDAY + 11 * 3600, HORIZON) == 0


def test_weekly_counts_wrap_past_the_weeks_end() -> None:
    bins = [0.0] * 168
    bins[0] = 4.0
    sunday_late = MONDAY + WEEK - 1800  # Sunday 23:30
    assert weekly_uses(activity(weekly=bins), sunday_late, 3600) == pytest.approx(1.0)


def test_weekly_counts_of_the_wrong_length_are_ignored() -> None:
    assert weekly_uses(activity(weekly=[5.0] * 24), MONDAY, HORIZON) == 0
