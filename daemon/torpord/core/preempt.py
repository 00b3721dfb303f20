"""A caller's call on a model wins over a policy's transition of it.

When a caller's mutation (or an Acquire) finds a transition that a policy
started (IDLE, PRESSURE, PRELOAD, SCHEDULE) running on the model, that
transition is cancelled, and rolls back as a failed one does (ABORTED,
reason PREEMPTED: what it allocated is freed, engines get back what is
still on the device), and the call goes on; the policy tries again later by
itself. Some transitions are let finish instead, and the call waits for
them: a Load, Wake or Unload (moving towards what a caller likely wants, or
one whose rollback leaves the model FAILED), and any transition past its
point of no return (releasing the old memory: its layers have moved or gone
already, so rolling back could no longer restore them).
"""

from __future__ import annotations

import asyncio

import structlog

from torpord.core.model import Model
from torpord.core.registry import Registry
from torpord.errors import Aborted
from torpord.types import Cause, Stage, TransitionKind

__all__ = ["CALLERS", "POLICY_CAUSES", "idle_for", "preempt"]

log = structlog.get_logger("torpord.core")

POLICY_CAUSES = frozenset({Cause.IDLE, Cause.PRESSURE, Cause.PRELOAD, Cause.SCHEDULE})
CALLERS = frozenset({Cause.USER, Cause.ACQUIRE})  # whose calls win
# Kinds of transition a preemption cancels; the others it waits for.
CANCELLED_KINDS = frozenset({TransitionKind.SLEEP, TransitionKind.OFFLOAD})


async def preempt(model: Model | None, cause: Cause) -> None:
    """If a caller's call (`cause` USER or ACQUIRE) finds a policy's
    transition of `model` running: stop it (or let it finish, see above)
    and return once it is over. Anything else returns at once."""
    if model is None or cause not in CALLERS or not model.busy:
        return
    running, progress = model.running, model.progress
    if running is None or progress is None or progress.cause not in POLICY_CAUSES:
        return
    if progress.kind in CANCELLED_KINDS and progress.stage is not Stage.RELEASE:
        log.info(
            "a caller's call preempts a policy's transition",
            model_id=model.model_id,
            transition=progress.kind.value,
            preempted_cause=progress.cause.value,
            cause=cause.value,
        )
        running.cancel(
            Aborted(
                f"the {progress.kind.value.lower()} of model {model.model_id!r}"
                f" ({progress.cause.value}) was preempted by a caller's call",
                reason="PREEMPTED",
                metadata={"model_id": model.model_id, "cause": progress.cause.value},
            )
        )
    await asyncio.wait([running.task])  # (it ends with its error, never cancelled)


async def idle_for(registry: Registry, model_id: str, cause: Cause) -> Model:
    """The model, idle: a policy's transition of it preempted first when a
    caller asks (else ABORTED for a busy model, as `Registry.idle`)."""
    await preempt(registry.find(model_id), cause)
    return registry.idle(model_id)
