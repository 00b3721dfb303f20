"""Time windows: whether a model's window is warm (open, or opening soon)."""

from __future__ import annotations

from torpord.policies.predict import WEEK, week_seconds
from torpord.policies.settings import ModelPolicy, Window
from torpord.types import Tier

__all__ = ["warm", "warm_window"]


def warm(window: Window, now: float) -> bool:
    """Whether `now` is in [start - lead, end) of `window`, on the weekly
    circle: a window whose end is before its start wraps past the week's
    end (Sunday night into Monday); one whose end equals its start lasts
    the whole week. A lead longer than the week's rest makes it always warm."""
    length = (window.end - window.start) % WEEK or WEEK
    span = min(length + max(window.lead, 0.0), WEEK)
    opens = (window.start - max(window.lead, 0.0)) % WEEK
    return (week_seconds(now) - opens) % WEEK < span


def warm_window(policy: ModelPolicy, now: float) -> Window | None:
    """The model's warm window now, if any: DEVICE before HOST when several
    are, so the stronger promise wins."""
    found = [window for window in policy.windows if warm(window, now)]
    found.sort(key=lambda window: window.tier is not Tier.DEVICE)
    return found[0] if found else None
