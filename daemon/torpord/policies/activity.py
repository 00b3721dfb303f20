"""Each model's use: when it was last used, how often, and when in the week.

`Activity` is kept by the daemon per model (on the event loop) and by the
simulator; the clock is always passed in. `summary()` is what policies see.

Memory per model is fixed: three rings of counts for the recent windows
(60 one-second buckets for the minute, 60 one-minute buckets for the hour,
96 fifteen-minute buckets for the day), 168 weekly bins, and at most
`MAX_REPORTERS` reporters with uses open. Recording and summarising cost
O(1) amortised: a ring is cleared bucket by bucket as the clock passes them
(at most its size at once), the weekly bins are decayed once per clock hour.

Windows: a use counts in a window of W seconds until the start of the
bucket W seconds after its own bucket, so it stays between W minus one
bucket width and W seconds (a use at 10.5 s counts in the minute window
until 70.0 s).

Weekly decay: the weight of a use halves every week (`WEEKLY_HALF_LIFE`),
applied in whole hours (a use's weight is 0.5 ** (hours passed / 168)):
last week's uses count half, the week before a quarter. A steady pattern of
c uses in an hour of each week converges to 2c in that hour's bin; what
matters to a prediction is the bins' shape and their ratio to other
models', which the decay keeps current while a model's habits change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torpord.policies.view import ActivitySummary

__all__ = [
    "HOURS_PER_WEEK",
    "MAX_REPORTERS",
    "RING_SIZES",
    "WEEKLY_HALF_LIFE",
    "WINDOWS",
    "Activity",
    "SavedActivity",
]

WINDOWS = (60.0, 3600.0, 86400.0)  # the recent windows, seconds
WEEKLY_HALF_LIFE = 7 * 86400.0  # seconds for a use's weekly weight to halve
# Reporters with uses open that one model keeps; past it the least recently
# reporting one is dropped (its open uses end), so a flood of reporter names
# costs bounded memory. Reporters with nothing open hold no memory at all.
MAX_REPORTERS = 64

HOURS_PER_WEEK = 168
_EPOCH_HOUR_OF_WEEK = 72  # 1970-01-01 00:00 UTC was a Thursday: Monday + 72 h
_RINGS = ((1.0, 60), (60.0, 60), (900.0, 96))  # (bucket width, buckets) per window
RING_SIZES = tuple(size for _, size in _RINGS)


@dataclass(frozen=True)
class SavedActivity:
    """What of a model's `Activity` outlives the daemon (core/activityfile.py):
    not the open uses, which belong to live engines and routers."""

    last_use: float
    uses: int
    busy_seconds: float
    weekly_hour: int | None  # the clock hour the weekly bins are decayed to
    weekly: tuple[float, ...]  # HOURS_PER_WEEK bins
    # Per recent window: its newest bucket (absolute number) and its counts.
    rings: tuple[tuple[int | None, tuple[int, ...]], ...]


class _Ring:
    """Counts in the last `size` buckets of `width` seconds, with their
    running total. A clock that goes back is held at the newest bucket."""

    __slots__ = ("counts", "index", "total", "width")

    def __init__(self, width: float, size: int) -> None:
        self.width = width
        self.counts = [0] * size
        self.total = 0
        self.index: int | None = None  # the newest bucket (absolute number)

    def advance(self, now: float) -> None:
        index = math.floor(now / self.width)
        if self.index is None:
            self.index = index
            return
        passed = index - self.index
        if passed <= 0:
            return
        size = len(self.counts)
        if passed >= size:
            self.counts = [0] * size
            self.total = 0
        else:
            for number in range(self.index + 1, index + 1):
                slot = number % size
                self.total -= self.counts[slot]
                self.counts[slot] = 0
        self.index = index

    def add(self, now: float, count: int) -> None:
        self.advance(now)
        assert self.index is not None
        self.counts[self.index % len(self.counts)] += count
        self.total += count


class _Weekly:
    """Uses per hour of the week, decayed as the clock's hours pass."""

    __slots__ = ("bins", "cached", "hour")

    def __init__(self) -> None:
        self.bins = [0.0] * HOURS_PER_WEEK
        self.hour: int | None = None  # the clock hour the bins are decayed to
        self.cached: tuple[float, ...] = ()

    def advance(self, now: float) -> None:
        hour = math.floor(now / 3600.0)
        if self.hour is None or hour <= self.hour:
            return
        factor = 0.5 ** ((hour - self.hour) * 3600.0 / WEEKLY_HALF_LIFE)
        self.bins = [count * factor for count in self.bins]
        self.hour = hour
        self.cached = tuple(self.bins)

    def add(self, now: float, count: int) -> None:
        if self.hour is None:
            self.hour = math.floor(now / 3600.0)
        self.advance(now)
        self.bins[(self.hour + _EPOCH_HOUR_OF_WEEK) % HOURS_PER_WEEK] += count
        self.cached = tuple(self.bins)

    def counts(self, now: float) -> tuple[float, ...]:
        self.advance(now)
        return self.cached


class Activity:
    """Uses of one model, from several reporters (each engine's attachment, a
    router): `record` adds uses reported in bulk (an agent's coalesced
    report: how many use() blocks ended, their busy time, and how many are
    open now); `forget` drops a reporter that went away (its open uses end).

    A reporter's `in_use` replaces its previous report's; `in_use` of the
    model is the sum over reporters. A reporter that never reports 0 again
    keeps its uses open until it is forgotten (the daemon forgets an
    engine's attachment when it ends) or, when its report gave a lease
    (`open_until`), until the lease runs out without a newer report: a
    router that vanished can't hold a model in use for ever."""

    __slots__ = (
        "_busy",
        "_expiry",
        "_in_use",
        "_last_use",
        "_next_expiry",
        "_open",
        "_rings",
        "_uses",
        "_weekly",
    )

    def __init__(self) -> None:
        self._last_use = 0.0
        self._uses = 0
        self._busy = 0.0
        self._in_use = 0  # the sum of _open's values
        # Reporters with uses open → how many; least recently reported first.
        self._open: dict[str, int] = {}
        # Reporters whose open uses end at a time unless reported again.
        self._expiry: dict[str, float] = {}
        self._next_expiry = math.inf  # the earliest of them
        self._rings = tuple(_Ring(width, size) for width, size in _RINGS)
        self._weekly = _Weekly()

    def record(
        self,
        now: float,
        reporter: str,
        uses: int,
        busy_seconds: float,
        in_use: int,
        *,
        open_until: float | None = None,
    ) -> None:
        """Add `uses` ended uses taking `busy_seconds` in all, and set
        `reporter`'s open uses to `in_use`, until it reports again or is
        forgotten, or (`open_until`) until that time at the latest. Raises
        ValueError for negative counts or a non-finite time (callers
        validate their input first)."""
        _check_clock(now)
        if uses < 0 or in_use < 0 or not math.isfinite(busy_seconds) or busy_seconds < 0:
            raise ValueError("uses, busy_seconds and in_use must be finite and >= 0")
        if open_until is not None and not math.isfinite(open_until):
            raise ValueError("open_until must be finite")
        self._expire(now)
        before = self._open.pop(reporter, 0)
        self._expiry.pop(reporter, None)
        if in_use:
            self._open[reporter] = in_use  # (re)inserted last: most recent
            if open_until is not None:
                self._expiry[reporter] = open_until
                self._next_expiry = min(self._next_expiry, open_until)
            if len(self._open) > MAX_REPORTERS:
                # Never `reporter` itself: it was just put last.
                oldest = next(iter(self._open))
                self._in_use -= self._open.pop(oldest)
                self._expiry.pop(oldest, None)
        self._in_use += in_use - before
        if uses or in_use or before:
            # A use ended, began, ended or is still open: the model is used now.
            self._last_use = max(self._last_use, now)
        if uses:
            self._uses += uses
            for ring in self._rings:
                ring.add(now, uses)
            self._weekly.add(now, uses)
        self._busy += busy_seconds

    def forget(self, now: float, reporter: str) -> None:
        """`reporter` went away: its open uses end now."""
        _check_clock(now)
        self._end(reporter, now)

    def _end(self, reporter: str, at: float) -> None:
        self._expiry.pop(reporter, None)
        before = self._open.pop(reporter, 0)
        if before:
            self._in_use -= before
            self._last_use = max(self._last_use, at)

    def _expire(self, now: float) -> None:
        """End the open uses whose lease ran out (at its end). O(1) until
        the earliest lease is due, then O(reporters with one)."""
        if now < self._next_expiry:
            return
        for reporter, until in list(self._expiry.items()):
            if until <= now:
                self._end(reporter, until)
        self._next_expiry = min(self._expiry.values(), default=math.inf)

    def summary(self, now: float) -> ActivitySummary:
        _check_clock(now)
        self._expire(now)
        recent = {}
        for window, ring in zip(WINDOWS, self._rings, strict=True):
            ring.advance(now)
            recent[window] = ring.total
        return ActivitySummary(
            last_use=self._last_use,
            in_use=self._in_use,
            uses=self._uses,
            busy_seconds=self._busy,
            recent=recent,
            weekly=self._weekly.counts(now),
        )

    def saved(self) -> SavedActivity:
        """A copy of what is kept across restarts."""
        return SavedActivity(
            last_use=self._last_use,
            uses=self._uses,
            busy_seconds=self._busy,
            weekly_hour=self._weekly.hour,
            weekly=tuple(self._weekly.bins),
            rings=tuple((ring.index, tuple(ring.counts)) for ring in self._rings),
        )

    def restore(self, saved: SavedActivity, now: float) -> None:
        """Replace the record's history with `saved` (validated by the
        caller: RING_SIZES counts per ring, HOURS_PER_WEEK bins); open uses
        stay as they are. Times after `now` (a clock that went back since)
        are held at now: a ring whose newest bucket is still to come starts
        empty, the weekly bins are decayed from now on, and the last use is
        now at the latest (so idle timeouts still run)."""
        _check_clock(now)
        self._last_use = min(saved.last_use, now)
        self._uses = saved.uses
        self._busy = saved.busy_seconds
        hour = math.floor(now / 3600.0)
        weekly = self._weekly = _Weekly()
        weekly.bins = list(saved.weekly)
        weekly.hour = None if saved.weekly_hour is None else min(saved.weekly_hour, hour)
        weekly.cached = tuple(weekly.bins)
        self._rings = tuple(_Ring(width, size) for width, size in _RINGS)
        for ring, (index, counts) in zip(self._rings, saved.rings, strict=True):
            if index is not None and index <= math.floor(now / ring.width):
                ring.counts = list(counts)
                ring.total = sum(counts)
                ring.index = index

    @property
    def reporters(self) -> int:
        """How many reporters have uses open."""
        return len(self._open)


def _check_clock(now: float) -> None:
    if not math.isfinite(now):
        raise ValueError("the clock must be finite")
