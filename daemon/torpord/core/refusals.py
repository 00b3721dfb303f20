"""RESOURCE_EXHAUSTED as a caller sees it when no eviction would make room."""

from __future__ import annotations

from torpord.errors import ResourceExhausted, some
from torpord.policies.actions import Refusal

__all__ = ["BLOCKER_KEYS", "refused"]

# The metadata key of each reason a model could not be evicted (policies/
# room.py): a FAILED model still holding memory, and an image with no room
# anywhere to go, are named too, so an operator sees everything in the way.
BLOCKER_KEYS = {
    "pinned": "pinned",
    "in use": "in_use",
    "in transition": "in_transition",
    "failed": "failed",
    "nowhere to go": "nowhere_to_go",
}


def refused(err: ResourceExhausted, refusal: Refusal) -> ResourceExhausted:
    """OUT_OF_MEMORY as the pool said, and why nothing evictable would make
    room: the models that block, by why (bounded lists of ids)."""
    by: dict[str, list[str]] = {}
    for model_id, why in sorted(refusal.blocked.items()):
        key = BLOCKER_KEYS.get(why)
        if key is not None:
            by.setdefault(key, []).append(model_id)
    blockers = "; ".join(f"{key.replace('_', ' ')}: {some(ids)}" for key, ids in by.items())
    return ResourceExhausted(
        f"{err.message}; evicting what may be evicted would not make room"
        + (f" (not evictable: {blockers})" if blockers else ""),
        reason="OUT_OF_MEMORY",
        metadata={
            **err.metadata,
            "short": refusal.short,
            **{key: some(ids) for key, ids in by.items()},
        },
    )
