"""What the scrubber's tests share: a clock that moves only when the
scrubber sleeps, and a scrubber of a harness's manager paced by it."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from torpord.core.scrubber import Scrubber

from .harness import Harness


class FakeTime:
    """A clock that moves only when the scrubber sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        # Called at each sleep (awaited, if it returns an awaitable).
        self.on_sleep: Callable[[], Any] | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if self.on_sleep is not None and inspect.isawaitable(got := self.on_sleep()):
            await got
        self.now += seconds
        await asyncio.sleep(0)


def scrubber(h: Harness, t: FakeTime, rate: int, interval: float = 0.0) -> Scrubber:
    m = h.manager
    return Scrubber(
        h.backend,
        m.registry,
        m.bus,
        lambda: m.disk,
        lambda slabs: m.mover.free_all(slabs, False),
        rate=rate,
        interval=interval,
        clock=t.clock,
        sleep=t.sleep,
    )
