"""Running a transition: its task, its rollback, its record, and its replay.

A planned transition (`Plan`: its memory allocated, its body ready) enters
its transitional state and runs as a task that keeps going if its caller
goes away. A failure, or a cancellation (a forced Unload, shutdown), rolls
it back: what it allocated is freed, engines get back what is still on the
device, and the model is left in the state before (or FAILED). A retry with
the same request_id gets the first call's outcome.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from torpord.backends.base import Backend, Slab
from torpord.core.announce import Announcer
from torpord.core.corrupt import refuse_suspect
from torpord.core.events import EventBus, EventType
from torpord.core.history import Finished, History
from torpord.core.model import (
    LayerState,
    Model,
    ModelSnapshot,
    Progress,
    Running,
    TransitionRecord,
)
from torpord.core.registry import Registry
from torpord.core.requests import RequestLog
from torpord.errors import Aborted, NotFound, TorporError
from torpord.types import Cause, ModelState, Outcome, Tier, TransitionKind

__all__ = ["HEARTBEAT", "Body", "Call", "Plan", "Runner", "current_task", "retrieve"]

log = structlog.get_logger("torpord.core")

Body = Callable[[], Awaitable[int]]

# How often a running transition's progress goes out on Watch even when no
# layer finished in between (a big layer can take seconds).
HEARTBEAT = 0.5


@dataclass(frozen=True)
class Call:
    """What the caller asked for, as far as running a transition goes."""

    request_id: str
    fingerprint: Hashable  # the arguments, to recognise a retry
    wait: bool
    cause: Cause = Cause.USER  # who asked: a caller, or a policy


@dataclass
class Plan:
    """A transition that has been decided and has its memory: ready to run."""

    kind: TransitionKind
    state: ModelState  # the transitional state it runs in
    layers: Sequence[LayerState]  # what it moves or frees
    body: Body  # does the work (Progress counts the bytes moved and freed)
    new: list[Slab] = field(default_factory=list)  # slabs allocated for it
    sleep_level: int | None = None  # shown while it runs
    fail_to: ModelState | None = None  # the state a failure leaves (default: the one before)
    removes: bool = False
    target: Tier | None = None  # where an Offload takes its layers (for the metrics)


class Runner:
    def __init__(
        self,
        backend: Backend,
        bus: EventBus,
        registry: Registry,
        requests: RequestLog,
        announcer: Announcer,
        history: History,
    ) -> None:
        self._backend = backend
        self._history = history
        self._bus = bus
        self._registry = registry
        self._requests = requests
        self._announcer = announcer
        # Called before a transition changes anything: what reads the
        # model's memory in the background (the scrubber) lets go of it.
        self.stand_aside: Callable[[Model], Awaitable[None]] | None = None
        # Host slabs found corrupt, not refused yet (the mover's `suspect`):
        # those of a model whose transition rolled back are refused then.
        self.suspect: dict[int, str] = {}

    async def start(
        self,
        model: Model,
        plan: Plan,
        call: Call,
        pending: asyncio.Future[ModelSnapshot] | None = None,
    ) -> ModelSnapshot:
        """Enter the plan's state and run it as a task. Nothing here may await
        before the task exists: the model must never look idle while it changes."""
        model.progress = Progress(
            plan.kind,
            sum(layer.plan.size for layer in plan.layers),
            len(plan.layers),
            call.cause,
        )
        before = (model.state, model.sleep_level)
        if plan.sleep_level is not None:
            model.sleep_level = plan.sleep_level
        model.set_state(plan.state)
        self._bus.publish(EventType.CHANGED, model.snapshot())
        running = Running(
            asyncio.create_task(
                self._run(model, plan, call.request_id, before),
                name=f"{plan.kind.value} {model.model_id}",
            )
        )
        task = running.task
        task.add_done_callback(retrieve)
        if pending is not None:
            task.add_done_callback(functools.partial(_chain, pending))
        model.running = running
        self._requests.remember(call.request_id, call.fingerprint, task)
        if call.wait:
            return await asyncio.shield(task)
        return model.snapshot()

    async def _run(
        self,
        model: Model,
        plan: Plan,
        request_id: str,
        before: tuple[ModelState, int],
    ) -> ModelSnapshot:
        assert model.progress is not None and model.running is not None
        running = model.running
        running.started = True
        started, clock = time.time(), time.monotonic()
        cause = model.progress.cause
        bound = log.bind(
            model_id=model.model_id,
            transition=plan.kind.value,
            request_id=request_id,
            cause=cause.value,
        )
        bound.info("transition started", bytes=model.progress.bytes_total)
        heartbeat = asyncio.create_task(self._heartbeat(model))
        try:
            if running.cause is not None:  # cancelled before its first step
                raise asyncio.CancelledError
            if self.stand_aside is not None:
                await self.stand_aside(model)
            await plan.body()
        except BaseException as exc:
            err = _as_domain_error(exc, running.cause)
            if isinstance(exc, TorporError | asyncio.CancelledError):
                bound.warning("transition failed", reason=err.reason, error=err.message)
            else:
                bound.exception("transition failed unexpectedly")
            self._roll_back(model, plan, before, err, bound)
            outcome = Outcome.FAILED if model.state is ModelState.FAILED else Outcome.ROLLED_BACK
            record = TransitionRecord(
                plan.kind,
                outcome,
                started,
                time.monotonic() - clock,
                model.progress.bytes_done,
                request_id,
                err.reason,
                err.message,
                model.progress.phases(),
                freed=model.progress.bytes_freed,
                cause=cause,
            )
            self._finish(model, record)
            self._record(model, plan, before, record)
            raise err from exc if err is not exc else None
        finally:
            heartbeat.cancel()
            self._announcer.done(model)
        record = TransitionRecord(
            plan.kind,
            Outcome.SUCCEEDED,
            started,
            time.monotonic() - clock,
            model.progress.bytes_done,
            request_id,
            phases=model.progress.phases(),
            note=model.progress.note,
            freed=model.progress.bytes_freed,
            cause=cause,
        )
        bound.info(
            "transition done",
            seconds=round(record.duration, 4),
            bytes=record.bytes,
            freed=record.freed,
            gb_per_s=round(record.bytes_per_second / 1e9, 3),
        )
        self._record(model, plan, before, record)
        if plan.removes:
            model.progress = None
            model.last_transition = record
            model.placed_by_caller = record.cause is Cause.USER
            model.set_state(ModelState.UNLOADED)  # (what the REMOVED event and the caller see)
            snapshot = model.snapshot()
            self._bus.publish(EventType.REMOVED, snapshot)
            return snapshot
        return self._finish(model, record)

    def _record(
        self, model: Model, plan: Plan, before: tuple[ModelState, int], record: TransitionRecord
    ) -> None:
        if plan.kind is TransitionKind.SLEEP:
            level = plan.sleep_level or 0
        elif plan.kind is TransitionKind.WAKE:
            level = before[1]
        else:
            level = 0
        source, first_layer = None, None
        progress = model.progress  # (None once a failed transition is finished)
        if plan.kind in (TransitionKind.LOAD, TransitionKind.WAKE) and progress is not None:
            source, first_layer = progress.main_source(), progress.first_layer
        self._history.add(
            Finished(model.model_id, model.device, level, record, source, first_layer, plan.target)
        )

    def _roll_back(
        self,
        model: Model,
        plan: Plan,
        before: tuple[ModelState, int],
        err: TorporError,
        bound: Any,  # (the transition's logger)
    ) -> None:
        in_use = {id(layer.slab) for layer in model.layers}
        for slab in plan.new:  # allocated for a move that never began (or failed)
            if not slab.freed and id(slab) not in in_use:
                try:
                    self._backend.free(slab)
                except Exception:  # (it stays accounted; the rollback goes on)
                    bound.exception("freeing a slab of the failed transition failed")
        if plan.fail_to is None:
            model.sleep_level = before[1]
        model.set_state(plan.fail_to or before[0], err.reason, err.message)
        # A host copy found corrupt (this transition's verified copy from it
        # failed, say) is refused now, not left for a later call to serve.
        refused = refuse_suspect(model, self.suspect)
        if refused:
            bound.warning(
                "a host copy found corrupt is refused",
                reason=model.state_reason,
                sleep_level=model.sleep_level,
                slabs=len(refused),
            )
        for slab in refused:  # (nothing maps a host slab: an engine maps the device's)
            try:
                self._backend.free(slab)
            except Exception:  # (it stays accounted; the rollback goes on)
                bound.exception("freeing a corrupt host copy failed")
        if plan.removes:
            self._announcer.done(model)
        else:
            self._announcer.give_back(model)

    async def _heartbeat(self, model: Model) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            self._announcer.progress(model, force=True)

    def _finish(self, model: Model, record: TransitionRecord) -> ModelSnapshot:
        model.progress = None
        model.last_transition = record
        model.placed_by_caller = record.cause is Cause.USER
        model.update_time = time.time()
        snapshot = model.snapshot()
        self._bus.publish(EventType.CHANGED, snapshot)
        return snapshot

    async def replay(
        self, task: asyncio.Future[ModelSnapshot], wait: bool, model_id: str
    ) -> ModelSnapshot:
        """The outcome of the first call with this request_id: at once without
        `wait` (once the model exists: a Load may still be validating)."""
        validation = self._registry.validating.get(model_id)
        if not wait and not task.done() and validation is not None:
            await asyncio.shield(validation.done)
        if wait or task.done() or model_id not in self._registry.models:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled():  # (the first call was, before it changed anything)
                    raise Aborted(
                        f"the first call with this request_id for model {model_id!r} was"
                        " cancelled before it changed anything; send it again",
                        reason="CANCELLED",
                        metadata={"model_id": model_id},
                    ) from None
                raise
        return self._registry.get(model_id)

    async def cancel(self, model_id: str, request_id: str) -> ModelSnapshot | None:
        """Cancel the model's running transition and wait until it has rolled
        back (as a failed one does: what it allocated is freed, engines get
        their layers back), wherever it is, its first step included. A Load
        still validating its checkpoint is stopped, and the id is free. An
        Unload in progress is left to finish: its result, if it removed the
        model, is returned. Another Unload racing this one finds the model busy."""
        by = f" (request_id {request_id!r})" if request_id else ""
        cause = Aborted(
            f"cancelled by a forced unload of model {model_id!r}{by}",
            reason="CANCELLED",
            metadata={"model_id": model_id, "cause": "FORCED_UNLOAD"},
        )
        validation = self._registry.validating.get(model_id)
        if validation is not None:
            log.info("cancelling a load's validation to unload", model_id=model_id)
            validation.running.cancel(cause)
            await asyncio.wait([validation.running.task])
            raise NotFound(
                f"model {model_id!r} not found: its Load, still validating the checkpoint,"
                " was cancelled and kept nothing",
                reason="MODEL_NOT_FOUND",
                metadata={"model_id": model_id},
            )
        model = self._registry.model(model_id)
        running = model.running
        if running is None or running.task.done():
            return None
        if model.state is ModelState.UNLOADING:
            await asyncio.wait([running.task])
            if running.task.exception() is None and self._registry.find(model_id) is not model:
                return running.task.result()
            return None  # (it failed: this Unload tries again)
        log.info("cancelling a transition to unload", model_id=model_id, state=model.state.value)
        running.cancel(cause)
        await asyncio.wait([running.task])  # (it ends with its error, never cancelled)
        if self._registry.find(model_id) is not model:
            # Removed as it rolled back: an image whose commit this cancelled
            # goes with its publisher (torpord.core.images). Unloaded, then.
            return model.snapshot()
        return None


def current_task() -> asyncio.Task[ModelSnapshot]:
    task = asyncio.current_task()
    assert task is not None
    return task


def _as_domain_error(exc: BaseException, cause: TorporError | None) -> TorporError:
    if isinstance(exc, TorporError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        # Who cancelled says why; a cancellation nobody explained is still ABORTED.
        return cause or Aborted("the transition was cancelled", reason="CANCELLED")
    return TorporError(f"internal error: {type(exc).__name__}: {exc}", reason="INTERNAL")


def _chain(dst: asyncio.Future[ModelSnapshot], src: asyncio.Future[ModelSnapshot]) -> None:
    if dst.done():
        return
    if src.cancelled():
        dst.cancel()
    elif (exc := src.exception()) is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src.result())


def retrieve(task: asyncio.Future[ModelSnapshot]) -> None:
    # A wait=false transition's failure is reported in the model; mark the
    # exception retrieved so asyncio does not log it a second time.
    if not task.cancelled():
        task.exception()
