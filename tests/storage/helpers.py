"""Helpers that more than one storage test module uses."""

from __future__ import annotations

from torpord.storage import diskcache
from torpord.storage.checksum import slab_checksum
from torpord.storage.diskcache import DiskCache


def put(cache: DiskCache, key: str, payload: bytes) -> diskcache.DiskEntry:
    """Write `payload` as the entry `key`, through a reservation as a move does."""
    room = cache.reserve([len(payload)], set())
    try:
        return cache.write(key, memoryview(payload), slab_checksum(payload), room)
    finally:
        cache.release(room)
