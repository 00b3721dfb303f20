"""What the engine registry needs of the rest of the daemon: the model
lookup, the event bus, the backend and publishing (the model manager gives
all of them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torpord.backends.base import Backend
from torpord.core.events import EventBus
from torpord.core.model import Model, ModelSnapshot
from torpord.storage.catalogue import CatalogueGroup

__all__ = ["EngineHost"]


class EngineHost(Protocol):
    @property
    def backend(self) -> Backend: ...

    @property
    def bus(self) -> EventBus: ...

    def get(self, model_id: str) -> ModelSnapshot:
        """The model's snapshot; NotFound if there is no such model."""
        ...

    def find(self, model_id: str) -> Model | None:
        """The live model (read it on the event loop, never keep it)."""
        ...

    async def begin_publish(
        self,
        model_id: str,
        fingerprint: str,
        groups: Sequence[CatalogueGroup],
        *,
        device: str,
        publisher: str,
    ) -> Model:
        """A new model, PUBLISHING, whose DEVICE slabs only `publisher` (an
        attachment id) may write (see torpord.core.images)."""
        ...

    async def commit_publish(self, model_id: str, publisher: str) -> ModelSnapshot:
        """Seal and checksum what the publisher wrote: the model is ACTIVE."""
        ...

    def abandon_publish(self, model_id: str, publisher: str) -> None:
        """The publisher went away: an uncommitted model is removed."""
        ...
