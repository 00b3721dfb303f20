"""What the engine registry needs of the rest of the daemon: the model
lookup, the event bus, the backend and publishing (the model manager gives
all of them)."""

from __future__ import annotations

from typing import Protocol

from torpord.backends.base import Backend
from torpord.core.counters import Counters
from torpord.core.events import EventBus
from torpord.core.images import Images
from torpord.core.model import Model, ModelSnapshot

__all__ = ["EngineHost"]


class EngineHost(Protocol):
    @property
    def backend(self) -> Backend: ...

    @property
    def bus(self) -> EventBus: ...

    @property
    def counters(self) -> Counters:
        """Counts for the metrics (engines attached, detached, revoked)."""
        ...

    def get(self, model_id: str) -> ModelSnapshot:
        """The model's snapshot; NotFound if there is no such model."""
        ...

    def find(self, model_id: str) -> Model | None:
        """The live model (read it on the event loop, never keep it)."""
        ...

    def report_activity(
        self, model_id: str, reporter: str, uses: int, busy_seconds: float, in_use: int
    ) -> None:
        """An engine's use() blocks (see ModelManager.report_activity)."""
        ...

    def forget_reporter(self, model_id: str, reporter: str) -> None:
        """The engine is gone: its open use() blocks end."""
        ...

    @property
    def images(self) -> Images:
        """Publishing: begin, commit, abandon (see torpord.core.images)."""
        ...
