"""request_id idempotency: a retried mutation gets the first call's result.

Only calls that started a transition are remembered (a call refused before it
changed anything is simply retried). Entries expire after `ttl` seconds and the
log keeps at most `capacity` of them, each small whatever the call carried:
an id of at most MAX_REQUEST_ID bytes (a longer one is refused) and a digest
of the call, not the call (an Offload may name thousands of layers).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from torpord.core.model import ModelSnapshot
from torpord.errors import InvalidArgument

__all__ = ["MAX_REQUEST_ID", "RequestLog"]

MAX_REQUEST_ID = 128  # bytes: room for any UUID or ULID, with a prefix


def _digest(fingerprint: Hashable) -> bytes:
    # The fingerprint holds ids, paths, names and enums: its repr is stable
    # within the process, which is as long as an entry lives.
    return hashlib.blake2b(repr(fingerprint).encode(errors="backslashreplace")).digest()


def _check_id(request_id: str) -> None:
    size = len(request_id.encode(errors="backslashreplace"))
    if size > MAX_REQUEST_ID:
        raise InvalidArgument(
            f"request_id is {size:,} bytes long; at most {MAX_REQUEST_ID} are allowed",
            reason="FIELD_TOO_LONG",
            metadata={"field": "request_id", "limit": MAX_REQUEST_ID, "size": size},
        )


@dataclass
class _Entry:
    fingerprint: bytes
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
        _check_id(request_id)
        self._expire()
        entry = self._entries.get(request_id)
        if entry is None:
            return None
        if entry.fingerprint != _digest(fingerprint):
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
            _check_id(request_id)
            self._entries.pop(request_id, None)  # (a new entry goes last: expiry order)
            self._entries[request_id] = _Entry(
                _digest(fingerprint), task, time.monotonic() + self._ttl
            )
            self._expire()

    def forget(self, request_id: str) -> None:
        """For a call refused before it changed anything: a retry runs anew."""
        self._entries.pop(request_id, None)
