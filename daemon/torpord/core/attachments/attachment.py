"""One engine's attachment to one model."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from torpord.backends.base import Slab
from torpord.core.attachments.messages import Outbox

__all__ = ["Attachment"]


@dataclass(eq=False)
class Attachment:
    id: str
    pid: int
    model_id: str
    engine: str
    rank: int
    layout_hash: str
    slab_kind: str  # "memfd" or "cuda"
    device_index: int
    device: str  # the device's UUID
    outbox: Outbox = field(default_factory=Outbox)
    # Quiesce sequence numbers waiting for their QuiesceAck: True when it came,
    # False when the stream ended first.
    acks: dict[int, asyncio.Future[bool]] = field(default_factory=dict)
    # The layers each unanswered Quiesce asked for (empty: every layer).
    quiescing: dict[int, list[str]] = field(default_factory=dict)
    sequence: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # The slabs the engine was sent and hasn't let go of, by layer name.
    mapped: dict[str, Slab] = field(default_factory=dict)
    # The engine's process, opened when it first took fds (its pid is then the
    # socket peer's, not just what Hello said); None before that.
    pidfd: int | None = None
    released: bool = False  # it said Release: it maps nothing, and takes nothing more
    # It is publishing the model (an image): until its commit, it alone may
    # take the slabs, and writable.
    writer: bool = False
    committing: asyncio.Task[None] | None = None
    misreported: bool = False  # an activity report of it was refused (logged once)

    def describe(self) -> str:
        who = f"engine {self.engine!r}" if self.engine else "engine"
        return f"{who} (pid {self.pid}, rank {self.rank})"
