"""What the scrubber checks, and when (core/scrubber.py does the checking).

The copies are the layers' host slabs and disk entries, and the disk entries
no model uses (`copies`). When each is due (`Schedule`):
- a copy not checked yet (just made, or rewritten: a new slab, a new file, so
  a new copy; or found when the daemon starts) is due SETTLE seconds after
  the scrubber first saw it, or `interval` if that is shorter (0: scrubbing
  without a pause, new copies too). The short wait leaves a model that has
  just slept to the wake that often follows at once, which then has the
  bandwidth to itself (a wake waits for one piece of a check at most
  anyway); a copy of a model in a transition is read only once it is over;
- a copy found clean is due again `interval` after that check.
Copies never checked go before re-checks, the first seen first; re-checks
go oldest check first. So a model that sleeps for a minute has its copies
checked within seconds whatever the interval, and a backlog of re-checks
does not hold back a new copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

from torpord.backends.base import Slab
from torpord.core.model import LayerState, Model
from torpord.core.registry import Registry
from torpord.storage.diskcache import DiskCache, DiskEntry
from torpord.types import Tier

__all__ = ["SETTLE", "Copy", "Key", "Schedule", "copies"]

SETTLE = 5.0  # seconds a new copy waits before its first check (see above)

Key = tuple[object, ...]


@dataclass(eq=False)
class Copy:
    """One copy to check: a layer's host slab, or its disk entry; or an entry
    no model uses (model and layer None), which a load may take."""

    model: Model | None
    index: int
    layer: LayerState | None
    slab: Slab | None = None
    entry: DiskEntry | None = None

    @property
    def tier(self) -> Tier:
        return Tier.HOST if self.slab is not None else Tier.DISK

    @property
    def key(self) -> Key:
        if self.slab is not None:
            return ("host", self.slab.id)
        assert self.entry is not None
        return ("disk", self.entry.key, self.entry.inode)

    @property
    def size(self) -> int:
        if self.slab is not None:
            return self.slab.size
        assert self.entry is not None
        return self.entry.size

    @property
    def expected(self) -> str:
        if self.layer is not None and self.layer.checksum:
            return self.layer.checksum
        return self.entry.checksum if self.entry is not None else ""

    def where(self) -> dict[str, object]:
        """What a log line says of it (never what it holds)."""
        tier = {"tier": self.tier.value.lower()}
        if self.model is None or self.layer is None:
            assert self.entry is not None
            return {"entry": self.entry.key, **tier}
        return {
            "model_id": self.model.model_id,
            "layer": self.layer.plan.name,
            "index": self.index,
            **tier,
        }


def copies(registry: Registry, disk: DiskCache | None) -> Iterator[Copy]:
    """Every copy not on a device, in model order, then the disk entries no
    model uses (those of models in a transition too: the scrubber checks,
    before it reads, that each is still what it was)."""
    for model_id in sorted(registry.models):
        model = registry.models[model_id]
        for index, layer in enumerate(model.layers):
            if not layer.checksum:  # (nothing to check it against yet)
                continue
            if layer.slab is not None and layer.slab.tier is Tier.HOST:
                yield Copy(model, index, layer, slab=layer.slab)
            if layer.disk is not None:
                yield Copy(model, index, layer, entry=layer.disk)
    if disk is not None:
        used = registry.disk_keys()
        for entry in sorted(disk.entries(), key=lambda e: e.key):
            if entry.key not in used:
                yield Copy(None, -1, None, entry=entry)


class Schedule:
    """When each copy is due, and which goes first (see the module's doc)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.settle = min(SETTLE, interval)
        self._clock = clock
        self._seen: dict[Key, float] = {}  # never checked: when first seen
        self._checked: dict[Key, float] = {}  # when last found clean

    def track(self, keys: Collection[Key]) -> None:
        """The copies there are now (a set): new ones are seen now, gone ones
        forgotten."""
        now = self._clock()
        for times in (self._seen, self._checked):
            for key in [key for key in times if key not in keys]:
                del times[key]
        for key in keys:
            if key not in self._checked:
                self._seen.setdefault(key, now)

    def due(self, key: Key) -> float:
        """When `key` (tracked) is to be checked."""
        if key in self._checked:
            return self._checked[key] + self.interval
        return self._seen[key] + self.settle

    def rank(self, key: Key) -> tuple[bool, float]:
        """What due copies are sorted by: never checked first (the first seen
        first), then the oldest check first."""
        if key in self._checked:
            return (True, self._checked[key])
        return (False, self._seen[key])

    def checked(self, key: Key) -> None:
        """`key` was checked now (and found clean, or refused: then it goes)."""
        self._seen.pop(key, None)
        self._checked[key] = self._clock()

    def wait(self, skip: Collection[Key], most: float) -> float:
        """Seconds until the next copy not in `skip` is due; `most` at most."""
        now = self._clock()
        due = [self.due(key) - now for key in (*self._seen, *self._checked) if key not in skip]
        return max(0.0, min([most, *due]))
