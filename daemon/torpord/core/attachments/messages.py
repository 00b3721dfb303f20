"""What the daemon and an attached engine say to each other, as domain
messages: the server's Attach servicer turns them into torpor.v1 messages
and back."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

from torpord.errors import TorporError
from torpord.storage.catalogue import CatalogueGroup

__all__ = ["Ended", "Hello", "Outbox", "Publish", "Published", "Quiesce", "Resume"]


@dataclass(frozen=True)
class Hello:
    """An engine attaching to a model: which process it is (by its own
    word until it takes fds), and what it calls itself."""

    model_id: str
    pid: int
    engine: str = ""
    rank: int = 0
    publish: Publish | None = None  # to publish model_id, not attach to it


@dataclass(frozen=True)
class Publish:
    """What an engine publishes (see torpord.core.images)."""

    fingerprint: str
    groups: tuple[CatalogueGroup, ...]
    device: str = ""


@dataclass(frozen=True)
class Published:
    """The image the engine wrote is committed: sealed, checksummed, ACTIVE.
    The engine maps it again, read-only, at the same addresses."""

    layout_hash: str


@dataclass(frozen=True)
class Quiesce:
    """Stop using `layers` (every layer if empty) and unmap them; answer
    with the sequence number within `timeout` seconds."""

    sequence: int
    layers: tuple[str, ...]
    timeout: float


@dataclass(frozen=True)
class Resume:
    """`layers` are on the device again: the engine may take and map them."""

    sequence: int
    layers: tuple[str, ...]
    layout_hash: str


@dataclass(frozen=True)
class Ended:
    """Put in an attachment's outbox: end its Attach stream with this error."""

    error: TorporError


Message = Quiesce | Resume | Published | Ended


class Outbox:
    """What an Attach stream sends next, in order: Quiesce and Resume
    messages, or Ended."""

    def __init__(self) -> None:
        self._items: collections.deque[Message] = collections.deque()
        self._ready = asyncio.Event()

    def put(self, item: Message) -> None:
        self._items.append(item)
        self._ready.set()

    async def get(self) -> Message:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, Resume):
            return self._coalesce(item)
        return item

    def _coalesce(self, first: Resume) -> Resume:
        # One Resume for the Resumes already waiting behind it (the engine then
        # asks for their fds at once), as long as nothing else comes between.
        layers = list(first.layers)
        sequence = first.sequence
        while self._items:
            nxt = self._items[0]
            if not isinstance(nxt, Resume):
                break
            self._items.popleft()
            layers.extend(nxt.layers)
            sequence = nxt.sequence
        if sequence == first.sequence:
            return first
        return Resume(sequence=sequence, layers=tuple(layers), layout_hash=first.layout_hash)
