"""How many times a model is expected to be used soon, from its activity.

The estimate (`expected_uses`) is the larger of two readings of the same
quantity, the uses expected in the next `horizon` seconds:

- recent: the mean of the rates of the recent windows (`recent`: window
  seconds → uses in it; the daemon keeps 60 s, 1 h and 1 day), times the
  horizon. A steady rate r reads r from every window, so the mean is r;
  a burst shows in the minute window at once and fades from the estimate
  as it leaves the longer ones (one use a few seconds ago reads about
  (1/60 + 1/3600 + 1/86400)/3 uses a second, about 20 in an hour).
- weekly: the hour-of-week counts (`weekly`, 168 bins, Monday 00:00 UTC
  first) over the hours the horizon covers, each weighed by the part of it
  inside the horizon, divided by `WEEKLY_MASS`: activity.py halves a use's
  weight each week, so a steady c uses in an hour of every week shows as
  2c in its bin. This is what warms a model before its usual hour begins.

The result is never below `FLOOR`: a model never used is still worth a
little, so that the cost order still weighs what it costs to bring back.
Pure arithmetic: the clock is the caller's `now`.
"""

from __future__ import annotations

import math

from torpord.policies.view import ActivitySummary

__all__ = [
    "FLOOR",
    "HORIZON",
    "HOURS_PER_WEEK",
    "WEEK",
    "WEEKLY_MASS",
    "expected_uses",
    "hour_of_week",
    "recent_rate",
    "week_seconds",
    "weekly_uses",
]

HORIZON = 3600.0  # seconds ahead that a prediction looks
FLOOR = 1e-3  # the fewest uses a prediction says (a never-used model)
WEEKLY_MASS = 2.0  # Σ 0.5**k: a steady weekly count c shows as 2c in its bin
WEEK = 7 * 86400.0
HOURS_PER_WEEK = 168
# 1970-01-01 00:00 UTC (clock 0) was a Thursday: 72 hours after Monday 00:00.
EPOCH_WEEK_OFFSET = 72 * 3600.0


def week_seconds(now: float) -> float:
    """Seconds since the last Monday 00:00 UTC (0 ≤ result < WEEK)."""
    return (now + EPOCH_WEEK_OFFSET) % WEEK


def hour_of_week(now: float) -> int:
    """The hour of the week `now` falls in (0 = Monday 00:00-01:00 UTC)."""
    return int(week_seconds(now) // 3600.0) % HOURS_PER_WEEK


def recent_rate(activity: ActivitySummary) -> float:
    """Uses per second: the mean of the recent windows' rates (0 without any)."""
    rates = [uses / window for window, uses in activity.recent.items() if window > 0]
    return sum(rates) / len(rates) if rates else 0.0


def weekly_uses(activity: ActivitySummary, now: float, horizon: float) -> float:
    """Uses the weekly counts expect in [now, now + horizon)."""
    bins = activity.weekly
    if len(bins) != HOURS_PER_WEEK or horizon <= 0:
        return 0.0
    total = 0.0
    start = week_seconds(now)
    end = start + min(horizon, WEEK)
    hour = math.floor(start / 3600.0)
    while hour * 3600.0 < end:
        inside = min(end, (hour + 1) * 3600.0) - max(start, hour * 3600.0)
        total += bins[hour % HOURS_PER_WEEK] * inside / 3600.0
        hour += 1
    return total / WEEKLY_MASS


def expected_uses(activity: ActivitySummary, now: float, horizon: float = HORIZON) -> float:
    """Uses expected in the next `horizon` seconds (at least FLOOR)."""
    return max(
        recent_rate(activity) * horizon,
        weekly_uses(activity, now, horizon),
        FLOOR,
    )
