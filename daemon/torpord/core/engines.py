"""What the core asks of the engines attached to a model (the agent registry).

The core never talks to engines itself: before it moves or frees memory that
engines map, it asks them to let go (`quiesce`), and as each layer lands on
the device it tells them (`resume`), so an engine can run layer i while later
layers are still arriving. The agent registry (torpord.core.attachments)
implements this, given to the manager by `ModelManager.use_engines`; a
manager without it (the core's own tests) has no engines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["Engines", "NoEngines"]


class Engines(Protocol):
    def attached(self, model_id: str) -> int:
        """How many engines are attached to the model."""
        ...

    async def quiesce(self, model_id: str, layers: Sequence[str]) -> list[str]:
        """Ask every engine attached to the model to stop using `layers` and
        unmap them; return once each has acknowledged, or has been detached
        (timed out or gone). Returns a note for each engine detached."""
        ...

    def resume(self, model_id: str, layers: Sequence[str]) -> None:
        """`layers` are on the device again: engines may map them."""
        ...

    def unloaded(self, model_id: str) -> None:
        """The model is gone: end every attachment to it."""
        ...


class NoEngines:
    def attached(self, model_id: str) -> int:
        return 0

    async def quiesce(self, model_id: str, layers: Sequence[str]) -> list[str]:
        return []

    def resume(self, model_id: str, layers: Sequence[str]) -> None:
        pass

    def unloaded(self, model_id: str) -> None:
        pass
