"""request_id idempotency: a retried mutation gets the first call's result.

Only calls that started a transition are remembered (a call refused before it
changed anything is simply retried). Entries expire after `ttl` seconds and the
log keeps at most `capacity` of them.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from torpord.core.model import ModelSnapshot
from torpord.errors import InvalidArgument

__all__ = ["RequestLog"]


@dataclass
class _Entry:
    fingerprint: Hashable
    task: asyncio.Future[ModelSnapshot]
    expires: float


class RequestLog:
    def __init__(self, ttl: float = 600.0, capacity: int = 4096) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.expires > now and len(self._entries) <= self._capacity:
                break
            del self._entries[key]

    def lookup(
        self, request_id: str, fingerprint: Hashable
    ) -> asyncio.Future[ModelSnapshot] | None:
        """The outcome (a task, or a future while a Load validates) of an earlier
        call with this id, if any."""
        if not request_id:
            return None
        self._expire()
        entry = self._entries.get(request_id)
        if entry is None:
            return None
        if entry.fingerprint != fingerprint:
            raise InvalidArgument(
                f"request_id {request_id!r} was already used for a different request",
                reason="REQUEST_ID_REUSED",
                metadata={"request_id": request_id},
            )
        return entry.task

    def remember(
        self, request_id: str, fingerprint: Hashable, task: asyncio.Future[ModelSnapshot]
    ) -> None:
        if request_id:
            self._entries[request_id] = _Entry(fingerprint, task, time.monotonic() + self._ttl)
            self._expire()

    def forget(self, request_id: str) -> None:
        """For a call refused before it changed anything: a retry runs anew."""
        self._entries.pop(request_id, None)
