"""A Load: room made for it, and a caller's Load joining a policy's.

Every Load goes through the pilot's `with_room` (a caller's that finds the
device full evicts). A policy's Load of a model (PRELOAD to host memory, a
SCHEDULE window's) is let finish rather than cancelled (core/preempt.py:
it moves towards what a caller likely wants, and rolling a Load back
leaves nothing). So a caller's Load (or an Acquire's) of that model from
the same source that finds it running, still validating the checkpoint
or already copying, joins it: it waits for it, answers with its result
(the policy fields it sets applied, as a Load of a loaded model does), and
then goes on to the tier the caller asked: a model the policy brought to
host memory is woken to the device when the caller asked for the device
(never the other way: a Load moves no model down). Without `wait`, the
call answers once the policy's checkpoint is validated (as a retry does)
and the Wake, if one is due, follows in the background. A Load from
another source is refused (ALREADY_EXISTS MODEL_EXISTS, naming the source).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import structlog

from torpord.core.model import ModelSnapshot
from torpord.core.pilot import Pilot
from torpord.core.policy import PolicyOverrides
from torpord.core.preempt import CALLERS, POLICY_CAUSES
from torpord.core.steering import Steered
from torpord.core.verbs import Verbs
from torpord.errors import TorporError
from torpord.storage.sources import resolve_source
from torpord.types import Cause, ModelState, Tier, TransitionKind

__all__ = ["Loads"]

log = structlog.get_logger("torpord.core")


class Loads:
    def __init__(self, manager: Steered, verbs: Verbs, pilot: Pilot) -> None:
        self._m = manager
        self._verbs = verbs
        self._pilot = pilot
        self._behind: set[asyncio.Task[None]] = set()  # Wakes no caller waits for

    async def load(
        self,
        model_id: str,
        source: str,
        device: str,
        target: Tier,
        wait: bool,
        request_id: str,
        cause: Cause,
        policy: PolicyOverrides,
    ) -> ModelSnapshot:
        """ModelManager.load's, once its arguments are complete."""

        def attempt() -> Awaitable[ModelSnapshot]:
            return self._verbs.load(
                model_id,
                source,
                device=device,
                target=target,
                wait=wait,
                request_id=request_id,
                cause=cause,
                policy=policy,
            )

        if not self._joinable(model_id, source, cause):
            return await self._pilot.with_room(model_id, cause, attempt)
        log.info("a caller's load joins a policy's", model_id=model_id, cause=cause.value)
        registry = self._m.registry
        if (validation := registry.validating.get(model_id)) is not None:
            await asyncio.shield(validation.done)
        model = registry.find(model_id)
        task = model.task if model is not None else None
        if wait and task is not None:
            await asyncio.wait([task])
        # The model as the policy's Load left it (or as it is now, without
        # `wait`), or this call's own Load if the policy's found nothing.
        got = await self._pilot.with_room(model_id, cause, attempt)
        if target is not Tier.DEVICE or got.state is ModelState.ACTIVE:
            return got
        if wait:
            return await self._wake(model_id, cause)
        behind = asyncio.create_task(self._wake_after(model_id, task, cause))
        self._behind.add(behind)
        behind.add_done_callback(self._behind.discard)
        return got

    def _joinable(self, model_id: str, source: str, cause: Cause) -> bool:
        """Whether a policy's Load of `model_id` from `source` runs now. The
        source is resolved (file system calls) only when one does: a Load
        that joins nothing resolves it once, in its own validation."""
        if cause not in CALLERS:
            return False
        validation = self._m.registry.validating.get(model_id)
        if validation is not None:
            running, by = validation.source, validation.cause
        else:
            model = self._m.registry.find(model_id)
            progress = model.progress if model is not None else None
            if (
                model is None
                or model.task is None
                or model.task.done()
                or progress is None
                or progress.kind is not TransitionKind.LOAD
            ):
                return False
            running, by = model.checkpoint.path, progress.cause
        if by not in POLICY_CAUSES:
            return False
        try:
            return resolve_source(source, self._m.settings.allowed_roots) == running
        except TorporError:
            return False  # (the call's own Load says why)

    async def _wake(self, model_id: str, cause: Cause) -> ModelSnapshot:
        """Wake the model a policy's Load left asleep, as the caller asked
        (a caller's Wake: it makes room); else the model as it is."""
        model = self._m.registry.find(model_id)
        if model is None or model.state not in (ModelState.ASLEEP, ModelState.OFFLOADED):
            return self._m.registry.get(model_id)
        return await self._m.wake(model_id, cause=cause)

    async def _wake_after(
        self, model_id: str, task: asyncio.Task[ModelSnapshot] | None, cause: Cause
    ) -> None:
        """`_wake` once `task` (the policy's Load) is over: a caller that
        did not wait hears of a failure from the log and the model's state."""
        if task is not None:
            await asyncio.wait([task])
        try:
            await self._wake(model_id, cause)
        except TorporError as err:
            log.info(
                "the wake after a joined load did not run",
                model_id=model_id,
                reason=err.reason,
                error=err.message,
            )

    async def stop(self) -> None:
        """Stop the Wakes not waited for (the daemon stops)."""
        tasks = list(self._behind)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
