"""A stand-in for torpord.policies.decide in the simulator's own tests.

Trivially simple on purpose (LRU, whole models, level-2 drops, idle sleep
to the policy's level): the simulator's tests check the engine's timing and
bookkeeping against hand-computed outcomes, which must not move when the
real policies change. What the real policies do is measured by the command
and the benchmark, which run torpord.policies.decide.
"""

from __future__ import annotations

from collections.abc import Sequence

from torpord.policies.actions import Action, Load, Refusal, Sleep, Wake
from torpord.policies.room import IN_TRANSITION, IN_USE, PINNED
from torpord.policies.view import ModelView, NodeView
from torpord.types import Cause, ModelState, Tier


def _evictable(m: ModelView) -> bool:
    return (
        not m.busy and not m.activity.in_use and not m.policy.pinned and m.bytes_in(Tier.DEVICE) > 0
    )


def _blocked(view: NodeView, model_id: str) -> dict[str, str]:
    """Why the models on the device that could not go stay (as the real
    policies say it: the daemon waits for those in use or in transition)."""
    out: dict[str, str] = {}
    for m in view.models:
        if m.model_id != model_id and m.bytes_in(Tier.DEVICE) > 0 and not _evictable(m):
            why = IN_TRANSITION if m.busy else IN_USE
            out[m.model_id] = PINNED if m.policy.pinned else why
    return out


def acquire(view: NodeView, model_id: str) -> Sequence[Action] | Refusal:
    target = view.model(model_id)
    assert target is not None
    missing = target.total_bytes - target.bytes_in(Tier.DEVICE)
    if target.state is ModelState.ACTIVE and not missing:
        return ()
    pool = view.devices[target.device]
    short = missing - pool.free
    actions: list[Action] = []
    candidates = sorted(
        (m for m in view.models if m.model_id != model_id and _evictable(m)),
        key=lambda m: m.activity.last_use,
    )
    for m in candidates:
        if short <= 0:
            break
        actions.append(Sleep(m.model_id, 2, Cause.PRESSURE))
        short -= m.bytes_in(Tier.DEVICE)
    if short > 0:
        return Refusal(pool.name, missing, short, _blocked(view, model_id))
    if target.state is ModelState.UNLOADED:
        actions.append(Load(model_id, target.source, Tier.DEVICE, Cause.ACQUIRE))
    else:
        actions.append(Wake(model_id, Cause.ACQUIRE))
    return actions


def housekeeping(view: NodeView) -> Sequence[Action]:
    out: list[Action] = []
    for m in view.models:
        timeout = m.policy.idle_timeout
        if (
            timeout > 0
            and m.state is ModelState.ACTIVE
            and not m.busy
            and not m.activity.in_use
            and view.now - max(m.activity.last_use, m.since) >= timeout
        ):
            out.append(Sleep(m.model_id, m.policy.idle_level, Cause.IDLE))
    return out
