"""A token bucket: what paces the scrubber's reads (core/scrubber.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """At most `rate` units a second on average, in bursts of `burst`."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens, self._at = burst, clock()

    def take(self, n: int) -> float:
        """Spend `n`: the seconds to wait before using them (0: now). What is
        spent ahead of time is a debt the next takes wait for."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        return max(0.0, -self._tokens / self.rate)
