"""The one event stream: every model added, changed or removed, and progress.

Subscribers get a bounded queue. One that falls too far behind is dropped
(its queue gets an Overflow marker) rather than slowing the daemon or growing
without bound; it watches again and starts from a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass

from torpord.core.model import ModelSnapshot
from torpord.errors import ResourceExhausted

__all__ = ["Event", "EventBus", "EventType", "Subscription"]


class EventType(enum.Enum):
    ADDED = "ADDED"
    CHANGED = "CHANGED"
    REMOVED = "REMOVED"
    PROGRESS = "PROGRESS"


@dataclass(frozen=True)
class Event:
    type: EventType
    model: ModelSnapshot


class _End:
    """Queued after the last event of a closed or overflowed subscription."""

    def __init__(self, overflow: bool) -> None:
        self.overflow = overflow


class Subscription:
    def __init__(self, bus: EventBus, model_id: str, maxsize: int) -> None:
        self._bus = bus
        self.model_id = model_id
        self._queue: asyncio.Queue[Event | _End] = asyncio.Queue(maxsize + 1)
        self._maxsize = maxsize
        self._ended = False

    def _offer(self, event: Event) -> None:
        if self._ended or (self.model_id and event.model.model_id != self.model_id):
            return
        if self._queue.qsize() >= self._maxsize:
            self._end(overflow=True)
            return
        self._queue.put_nowait(event)

    def _end(self, *, overflow: bool) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put_nowait(_End(overflow))
            self._bus._subscribers.discard(self)

    def close(self) -> None:
        self._end(overflow=False)

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, _End):
                    if item.overflow:
                        raise ResourceExhausted(
                            f"watcher fell more than {self._maxsize} events behind; watch again",
                            reason="WATCH_OVERFLOW",
                        )
                    return
                yield item
        finally:
            self.close()


class EventBus:
    def __init__(self, maxsize: int = 4096) -> None:
        self._subscribers: set[Subscription] = set()
        self._maxsize = maxsize
        self._closed = False

    def subscribe(self, model_id: str = "") -> Subscription:
        sub = Subscription(self, model_id, self._maxsize)
        if self._closed:
            sub.close()
        else:
            self._subscribers.add(sub)
        return sub

    def publish(self, type: EventType, model: ModelSnapshot) -> None:
        for sub in list(self._subscribers):
            sub._offer(Event(type, model))

    def close(self) -> None:
        """End every stream (on shutdown)."""
        self._closed = True
        for sub in list(self._subscribers):
            sub.close()
