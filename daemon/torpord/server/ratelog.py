"""Logging what strangers send, at a bounded rate.

A refused request is worth a log line, but anyone who can reach a socket can
send a million of them: each site that logs refusals takes a token from its
own bucket (`burst` lines at once, refilled at `burst` a `period`), and the
next line it is allowed says how many it kept quiet about meanwhile.
"""

from __future__ import annotations

import threading
import time

__all__ = ["LogBudget"]


class LogBudget:
    """A token bucket for one kind of log line; safe to share between threads."""

    def __init__(self, burst: int = 5, period: float = 60.0) -> None:
        self._burst = burst
        self._rate = burst / period
        self._tokens = float(burst)
        self._at = time.monotonic()
        self._suppressed = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """None: stay quiet. Otherwise log, saying how many lines were
        skipped since the last one (the number returned)."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens < 1:
                self._suppressed += 1
                return None
            self._tokens -= 1
            skipped, self._suppressed = self._suppressed, 0
            return skipped
