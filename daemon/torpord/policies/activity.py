"""Each model's use: when it was last used, how often, and when in the week.

`Activity` is kept by the daemon per model (on the event loop) and by the
simulator; the clock is always passed in. `summary()` is what policies see.
"""

from __future__ import annotations

from torpord.policies.view import ActivitySummary

__all__ = ["Activity"]


class Activity:
    """Uses of one model, from several reporters (each engine's attachment, a
    router): `record` adds uses reported in bulk (an agent's coalesced
    report: how many use() blocks ended, their busy time, and how many are
    open now); `forget` drops a reporter that went away (its open uses end)."""

    def record(
        self, now: float, reporter: str, uses: int, busy_seconds: float, in_use: int
    ) -> None:
        raise NotImplementedError

    def forget(self, now: float, reporter: str) -> None:
        raise NotImplementedError

    def summary(self, now: float) -> ActivitySummary:
        raise NotImplementedError
