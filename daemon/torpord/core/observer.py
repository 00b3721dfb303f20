"""What the mover tells about the model it moves (the manager listens).

The mover never publishes or talks to engines itself: it reports to one
observer. The manager's announcer implements this; a mover without it (a
bench, a test of the mover alone) reports to nobody.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torpord.core.model import LayerState, Model

__all__ = ["MoveObserver", "NoObserver"]


class MoveObserver(Protocol):
    def progress(self, model: Model, *, force: bool = False) -> None:
        """The model's progress changed (bytes, layers, a note); `force`: a
        stage changed, or a heartbeat, so say so now rather than throttled."""
        ...

    def landed(self, model: Model, layer: LayerState) -> None:
        """`layer` points at a new slab, filled and checked: if that slab is on
        the device, engines may map it (progressive wake)."""
        ...

    async def retract(self, model: Model, layers: Sequence[LayerState]) -> None:
        """A failed move is about to free the new slabs of `layers`, which
        `landed` announced: return once engines have let go of them."""
        ...


class NoObserver:
    def progress(self, model: Model, *, force: bool = False) -> None:
        pass

    def landed(self, model: Model, layer: LayerState) -> None:
        pass

    async def retract(self, model: Model, layers: Sequence[LayerState]) -> None:
        pass
