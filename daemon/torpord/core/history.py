"""The node's recent transitions, finished: for `torporctl stats` and metrics.

Every transition the runner ends (succeeded, rolled back or failed, whoever
caused it) is added once. A bounded ring keeps the latest for quantiles over
the daemon's recent history; listeners (the metrics) hear each one as it is
added, on the event loop's thread, and must not block.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

from torpord.core.model import TransitionRecord
from torpord.types import Tier, TransitionKind

__all__ = ["HISTORY_SIZE", "Finished", "History"]

# Finished transitions kept for stats (a few hundred bytes each).
HISTORY_SIZE = 4096


@dataclass(frozen=True)
class Finished:
    model_id: str
    device: str  # the model's device ("" for none)
    # The sleep level it concerns: what a SLEEP went to, what a WAKE came
    # from; 0 for the other kinds.
    level: int
    record: TransitionRecord
    # Where a LOAD's or WAKE's bytes came from (the tier most of them came
    # from); None when unknown or for the other kinds.
    source: Tier | None = None
    # Seconds from the start until the first layer was on the device (a WAKE
    # or LOAD that put layers there), None otherwise.
    first_layer: float | None = None
    # Where an OFFLOAD took its layers (DEVICE, HOST or DISK); None otherwise.
    target: Tier | None = None


Listener = Callable[[Finished], None]


class History:
    """The last `size` finished transitions, oldest first, and their listeners."""

    def __init__(self, size: int = HISTORY_SIZE) -> None:
        self._ring: collections.deque[Finished] = collections.deque(maxlen=size)
        self._listeners: list[Listener] = []

    @property
    def capacity(self) -> int:
        """The most transitions kept: once as many are, each added lets the oldest go."""
        return self._ring.maxlen or 0

    def add(self, finished: Finished) -> None:
        self._ring.append(finished)
        for listener in list(self._listeners):
            listener(finished)

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with each transition added from now on; returns
        the function that stops it."""
        self._listeners.append(listener)

        def stop() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return stop

    def recent(self, model_id: str = "", kind: TransitionKind | None = None) -> list[Finished]:
        """The transitions kept, oldest first; only `model_id`'s and `kind`'s when given."""
        return [
            f
            for f in self._ring
            if (not model_id or f.model_id == model_id) and (kind is None or f.record.kind is kind)
        ]
