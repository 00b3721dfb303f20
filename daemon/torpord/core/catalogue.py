"""The catalogue: models the daemon knows by a source and a policy, loaded or not.

An entry says what an Acquire loads an id from (source, device) and the
policy the model gets. Entries come from the config's `[[catalogue]]` and
from RegisterModel at run time; they live in memory only (the config's come
back at the next start, RegisterModel's do not). The number of entries is
bounded. An entry's size (its planned layers, read from its source's
headers) is kept with it: core/sizes.py reads and refreshes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from torpord.config.model import MAX_CATALOGUE
from torpord.errors import NotFound, ResourceExhausted
from torpord.policies.settings import ModelPolicy

__all__ = ["Catalogue", "Entry", "Size"]


@dataclass(frozen=True)
class Size:
    """What a Load of an entry's source would allocate, and what it was read from."""

    layers: tuple[tuple[str, int], ...]  # each planned layer's name and slab size
    # What says the source is unchanged (core/sizes.py): each path looked
    # at, with its (device, inode, size, mtime_ns); None for one missing.
    identity: tuple[tuple[str, tuple[int, int, int, int] | None], ...]

    @property
    def total(self) -> int:
        return sum(size for _, size in self.layers)


@dataclass(frozen=True)
class Entry:
    model_id: str
    source: str  # as given (absolute, checked against the allowed roots)
    device: str  # a device's UUID; "" for the freest at load time
    policy: ModelPolicy  # resolved: the entry's own fields over the config's defaults
    create_time: float = field(default_factory=time.time, compare=False)
    # None until its source has been read (or while it can't be): policies
    # then plan no room for it (core/sizes.py).
    size: Size | None = field(default=None, compare=False)


class Catalogue:
    def __init__(
        self,
        default: ModelPolicy | None = None,
        entries: tuple[Entry, ...] = (),
        *,
        limit: int = MAX_CATALOGUE,
    ) -> None:
        """`default`: the policy of a model with no entry (config `[policy.default]`)."""
        self.default = default if default is not None else ModelPolicy()
        self.limit = limit
        self._entries: dict[str, Entry] = {}
        for entry in entries:
            self.put(entry)

    def get(self, model_id: str) -> Entry | None:
        return self._entries.get(model_id)

    def entries(self) -> list[Entry]:
        """Every entry, by model id."""
        return [self._entries[k] for k in sorted(self._entries)]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    def policy_for(self, model_id: str) -> ModelPolicy:
        """The policy a model gets when its Load sets none: its entry's, else the default."""
        entry = self._entries.get(model_id)
        return entry.policy if entry is not None else self.default

    def put(self, entry: Entry) -> None:
        """Add or replace an entry; RESOURCE_EXHAUSTED (CATALOGUE_FULL) for a new
        one beyond the limit."""
        if entry.model_id not in self._entries and len(self._entries) >= self.limit:
            raise ResourceExhausted(
                f"the catalogue is full ({self.limit} entries); deregister one first",
                reason="CATALOGUE_FULL",
                metadata={"model_id": entry.model_id, "limit": self.limit},
            )
        self._entries[entry.model_id] = entry

    def remove(self, model_id: str) -> Entry:
        """Remove an entry; NOT_FOUND (MODEL_NOT_REGISTERED) when there is none."""
        entry = self._entries.pop(model_id, None)
        if entry is None:
            raise NotFound(
                f"model {model_id!r} is not registered",
                reason="MODEL_NOT_REGISTERED",
                metadata={"model_id": model_id},
            )
        return entry
