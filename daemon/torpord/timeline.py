"""When several workers were doing one kind of work: its wall time and busy time.

Workers overlap (eight read threads, concurrent disk writes). Their times
summed are busy time, which may be many times the clock time the work took;
what an operator means by "reading took 3 s" is wall time: how long at least
one worker was at it, the union of their intervals. A `Timeline` keeps both.
Times are `time.monotonic()` values, which compare across threads.
"""

from __future__ import annotations

import bisect

__all__ = ["MAX_SPANS", "Timeline"]

# Disjoint spans kept before the shortest gaps between them are closed. One
# slow worker alternating between two kinds of work leaves a gap after every
# chunk (a million for a large model read in 1 MiB chunks); memory stays
# bounded, and the wall time grows by at most the gaps closed.
MAX_SPANS = 4096


class Timeline:
    """The union of the intervals added (wall time) and their sum (busy time).
    Not thread-safe: a caller with several threads holds a lock around it."""

    __slots__ = ("_ends", "_starts", "busy")

    def __init__(self) -> None:
        # Disjoint spans in order: _starts[i] < _ends[i] < _starts[i + 1].
        self._starts: list[float] = []
        self._ends: list[float] = []
        self.busy = 0.0

    @classmethod
    def of(cls, start: float, end: float) -> Timeline:
        timeline = cls()
        timeline.add(start, end)
        return timeline

    def add(self, start: float, end: float) -> None:
        """One worker was at it from start to end."""
        if end <= start:
            return
        self.busy += end - start
        self._merge(start, end)

    def update(self, other: Timeline) -> None:
        """Fold in another timeline of the same kind of work (other workers)."""
        for start, end in zip(other._starts, other._ends, strict=True):
            self._merge(start, end)
        self.busy += other.busy

    @property
    def wall(self) -> float:
        return sum(end - start for start, end in zip(self._starts, self._ends, strict=True))

    def spans(self) -> list[tuple[float, float]]:
        return list(zip(self._starts, self._ends, strict=True))

    def _merge(self, start: float, end: float) -> None:
        # The spans that overlap or touch [start, end] are lo .. hi-1 (none if lo == hi).
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]
        if len(self._starts) > MAX_SPANS:
            self._coarsen()

    def _coarsen(self) -> None:
        """Close the shorter half of the gaps (at least half of them)."""
        starts, ends = self._starts, self._ends
        gaps = [starts[i + 1] - ends[i] for i in range(len(starts) - 1)]
        limit = sorted(gaps)[len(gaps) // 2]
        kept_starts, kept_ends = [starts[0]], []
        for i, gap in enumerate(gaps):
            if gap > limit:
                kept_ends.append(ends[i])
                kept_starts.append(starts[i + 1])
        kept_ends.append(ends[-1])
        self._starts, self._ends = kept_starts, kept_ends
