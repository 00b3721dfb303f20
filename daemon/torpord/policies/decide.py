"""The decisions: the entry points the daemon and the simulator call.

Each is a pure function of a NodeView: same view, same answer.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from torpord.policies.actions import Action, Refusal
from torpord.policies.view import NodeView

__all__ = ["acquire", "housekeeping", "make_room"]


def make_room(
    view: NodeView, pool: str, needed: int, *, keep: Collection[str] = ()
) -> Sequence[Action] | Refusal:
    """Actions that free at least `needed` bytes of `pool` (a device's uuid,
    or "host"), by the configured eviction order, never touching the models
    in `keep` (the one the room is for), pinned ones, ones in use or in a
    transition; or a Refusal naming why not. `needed` counts only what is
    missing: free memory is already subtracted by the caller."""
    raise NotImplementedError


def acquire(view: NodeView, model_id: str) -> Sequence[Action] | Refusal:
    """What makes `model_id` ready on its device: the evictions that make
    room (if any) and then its Wake, Offload to DEVICE or Load (a catalogue
    entry); () when it is ready already."""
    raise NotImplementedError


def housekeeping(view: NodeView) -> Sequence[Action]:
    """What the daemon does on its own at this moment: idle models to sleep
    (IDLE), sleepers past `max_sleeping_models` or the host limit pushed down
    (PRESSURE), models whose window opens warmed (SCHEDULE), models predicted
    to be wanted warmed into free memory (PRELOAD). Never evicts a model in
    use or more likely to be used than the one it makes room for."""
    raise NotImplementedError
