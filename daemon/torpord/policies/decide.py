"""The decisions: the entry points the daemon and the simulator call.

Each is a pure function of a NodeView: same view, same answer (every
choice is ordered, ties broken by model id). The actions come in
execution order: run them one after the other, each as an ordinary
transition with its cause. Whether the policy layer is on
(`settings.enabled`) is the caller's to check before `make_room` and
`acquire` (with it off the daemon refuses what does not fit);
`housekeeping` does nothing when it is off.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from torpord.errors import FailedPrecondition, InvalidArgument, NotFound
from torpord.policies.actions import Action, Load, Refusal, Wake
from torpord.policies.housekeeping import housekeeping
from torpord.policies.room import Plan, free_up
from torpord.policies.stage import stage
from torpord.policies.view import NodeView
from torpord.types import Cause, ModelState, Tier

__all__ = ["acquire", "housekeeping", "make_room"]


def make_room(
    view: NodeView, pool: str, needed: int, *, keep: Collection[str] = ()
) -> Sequence[Action] | Refusal:
    """Actions that free at least `needed` bytes of `pool` (a device's uuid,
    or "host"), by the configured eviction order, never touching the models
    in `keep` (the one the room is for), pinned ones, ones in use or in a
    transition; or a Refusal naming why not. `needed` counts only what is
    missing: free memory is already subtracted by the caller.

    Evictions of a device go where each model's policy says (room.py);
    a level-1 sleep needs host room, made first by pushing the coldest
    level-1 sleepers down to level 2: those actions come first, so the
    list is in execution order. Every action's cause is PRESSURE.
    Raises InvalidArgument (UNKNOWN_DEVICE) for a pool the view lacks."""
    plan = Plan.start(view)
    plan.keep = frozenset(keep)
    refusal = free_up(plan, pool, needed)
    return refusal if refusal is not None else tuple(plan.actions)


def acquire(view: NodeView, model_id: str) -> Sequence[Action] | Refusal:
    """What makes `model_id` ready on its device: the evictions that make
    room (if any) and then its Wake (ASLEEP or OFFLOADED) or Load to DEVICE
    (a catalogue entry: UNLOADED with a source), cause ACQUIRE; () when it
    is ready already (ACTIVE).

    A model in a transition (busy, or in a transitional state) also gets
    (): the caller waits for that transition to end and asks again, so
    concurrent Acquires share one transition rather than racing it.
    A model whose weights are on its source or a disk copy, when room must
    be made for it on the device, is staged instead (`settings.staging`,
    stage.py): the actions read it into host memory (a Load to HOST, or a
    Sleep at level 1 of a level-2 sleeper), and the caller asks again when
    they are done.
    A Refusal when nothing evictable makes room (the model itself is kept:
    "asked for"). Raises NotFound for a model the view lacks,
    FailedPrecondition for one that can't be made ready (FAILED, or UNLOADED
    without a source), InvalidArgument for a device the view lacks."""
    model = view.model(model_id)
    if model is None:
        raise NotFound(
            f"model {model_id!r} is neither loaded nor registered",
            reason="MODEL_NOT_FOUND",
            metadata={"model_id": model_id},
        )
    if model.busy or model.state.transitional or model.state is ModelState.ACTIVE:
        return ()
    action: Action
    if model.state is ModelState.UNLOADED and model.source:
        needed = model.total_bytes
        action = Load(model_id, model.source, Tier.DEVICE, Cause.ACQUIRE)
    elif model.state in (ModelState.ASLEEP, ModelState.OFFLOADED):
        needed = model.total_bytes - model.bytes_in(Tier.DEVICE)
        action = Wake(model_id, Cause.ACQUIRE)
    else:
        raise FailedPrecondition(
            f"cannot acquire model {model_id!r} while it is {model.state.value.lower()}"
            + (" (unload it)" if model.state is ModelState.FAILED else " and has no source"),
            reason="INVALID_STATE",
            metadata={"model_id": model_id, "state": model.state.value},
        )
    pool = view.devices.get(model.device)
    if pool is None:
        raise InvalidArgument(
            f"model {model_id!r} is on device {model.device!r}, which the node lacks",
            reason="UNKNOWN_DEVICE",
            metadata={"model_id": model_id, "device": model.device},
        )
    plan = Plan.start(view)
    plan.keep = frozenset({model_id})
    refusal = free_up(plan, model.device, needed - pool.free)
    if refusal is not None:
        return refusal
    staging = view.settings.staging and bool(plan.actions)
    if staging and (staged := stage(view, model, Cause.ACQUIRE)) is not None:
        return staged  # (the caller asks again when it is in host memory)
    return (*plan.actions, action)
