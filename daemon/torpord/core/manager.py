"""The model manager: the registry and every lifecycle transition.

Public methods are what the gRPC servicer (and tests) call. Each mutation
checks its arguments and the model's state, allocates everything it will need
(so RESOURCE_EXHAUSTED is answered before anything changes), then runs the
transition as a task that keeps going if its caller goes away. One transition
per model at a time: a mutation of a busy model is refused with ABORTED.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import re
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from torpord.backends.base import Backend, Slab
from torpord.core.engines import Engines, NoEngines
from torpord.core.events import EventBus, EventType
from torpord.core.model import (
    LayerState,
    Model,
    ModelSnapshot,
    Progress,
    Running,
    TransitionRecord,
)
from torpord.core.mover import Mover
from torpord.core.requests import RequestLog
from torpord.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TorporError,
    some,
)
from torpord.storage.checkpoint import open_checkpoint
from torpord.storage.diskcache import DiskCache, cache_key
from torpord.storage.gcpause import gc_paused
from torpord.storage.layers import (
    DEFAULT_LAYER_PATTERNS,
    LayerPatterns,
    layout_hash,
    plan_layers,
)
from torpord.storage.pipeline import ReadOptions
from torpord.storage.reader import check_unchanged
from torpord.storage.safetensors import Checkpoint
from torpord.storage.sources import resolve_source
from torpord.types import ModelState, Outcome, Stage, Tier, TransitionKind

__all__ = ["ManagerSettings", "ModelManager"]

log = structlog.get_logger("torpord.core")

MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ManagerSettings:
    allowed_roots: tuple[Path, ...]
    patterns: LayerPatterns = DEFAULT_LAYER_PATTERNS
    alignment: int = 256
    worker_threads: int = 4
    read: ReadOptions = field(default_factory=ReadOptions)


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


class ModelManager:
    def __init__(
        self,
        backend: Backend,
        settings: ManagerSettings,
        *,
        bus: EventBus | None = None,
        disk: DiskCache | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.bus = bus or EventBus()
        self.requests = RequestLog()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            settings.worker_threads, thread_name_prefix="torpord-io"
        )
        self.disk = disk
        self.mover = Mover(
            backend,
            self._executor,
            self._on_progress,
            settings.read,
            disk,
            on_landed=self._on_landed,
            retract=self._retract,
            disk_in_use=self._disk_keys,
        )
        self._models: dict[str, Model] = {}
        # Ids whose Load is still validating the checkpoint: the task of that call.
        self._validating: dict[str, Running] = {}
        # ... and what a retry without waiting waits for: the validation's end.
        self._validated: dict[str, asyncio.Future[None]] = {}
        # The engines attached to models (see use_engines).
        self.engines: Engines = NoEngines()
        # Per model being brought to the device: the layers not yet announced
        # to engines, in forward order, and those of them that have landed.
        self._unannounced: dict[str, tuple[list[str], set[str]]] = {}
        # Per model in a transition: the layers engines were asked to let go of.
        self._quiesced: dict[str, list[str]] = {}

    def use_engines(self, engines: Engines) -> None:
        """Ask `engines` (the agent registry) to let go before memory they map
        moves, and tell them as layers land; before this, there are none."""
        self.engines = engines

    # -- reading -------------------------------------------------------------

    def get(self, model_id: str) -> ModelSnapshot:
        return self._model(model_id).snapshot()

    def find(self, model_id: str) -> Model | None:
        """The live model (not a snapshot), for the engine registry: read it on
        the event loop, never keep it."""
        return self._models.get(model_id)

    def list_models(self) -> list[ModelSnapshot]:
        return [self._models[k].snapshot() for k in sorted(self._models)]

    def _model(self, model_id: str) -> Model:
        model = self._models.get(model_id)
        if model is None:
            _check_model_id(model_id)
            raise NotFound(
                f"model {model_id!r} not found",
                reason="MODEL_NOT_FOUND",
                metadata={"model_id": model_id},
            )
        return model

    # -- mutations -----------------------------------------------------------

    async def load(
        self,
        model_id: str,
        source: str,
        *,
        device: str = "",
        target: Tier = Tier.DEVICE,
        wait: bool = True,
        request_id: str = "",
    ) -> ModelSnapshot:
        _check_model_id(model_id)
        if target not in (Tier.DEVICE, Tier.HOST):
            raise InvalidArgument(
                f"a model can be loaded to DEVICE or HOST, not {target.value}",
                reason="INVALID_TIER",
                metadata={"tier": target.value},
            )
        path = resolve_source(source, self.settings.allowed_roots)
        call = Call(request_id, ("load", model_id, path, device, target), wait)
        if (earlier := self.requests.lookup(request_id, call.fingerprint)) is not None:
            return await self._replay(earlier, wait, model_id)
        existing = self._models.get(model_id)
        if existing is not None:
            if existing.checkpoint.path != path:
                raise AlreadyExists(
                    f"model {model_id!r} already exists with source {existing.checkpoint.path}",
                    reason="MODEL_EXISTS",
                    metadata={"model_id": model_id, "source": existing.checkpoint.path},
                )
            if existing.state is ModelState.LOADING and existing.task is not None:
                return await self._replay(existing.task, wait, model_id)
            if existing.busy or existing.state.transitional:
                raise _busy(model_id, existing.state.value)
            return existing.snapshot()
        if model_id in self._validating:
            raise _busy(model_id, "LOADING")
        uuid = self.backend.resolve_device(device) if device else ""
        # A retry that comes while the checkpoint is being validated waits for this.
        pending: asyncio.Future[ModelSnapshot] = asyncio.get_running_loop().create_future()
        pending.add_done_callback(_retrieve)
        self.requests.remember(request_id, call.fingerprint, pending)
        # This call's task, so a forced Unload can stop the validation.
        validation = Running(_current_task(), started=True)
        self._validating[model_id] = validation
        validated = self._validated[model_id] = asyncio.get_running_loop().create_future()
        try:
            # Not through mover.blocking: nothing is written into a slab here,
            # so a cancelled call need not wait for the worker to finish.
            # Parsing and planning are O(tensors): off the event loop.
            checkpoint, layers, layout = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._prepare, path
            )
            model = Model(model_id, checkpoint, uuid or self.backend.pick_device(), layers)
            model.layout_hash = layout
            new = self.mover.allocate(model, model.layers, target)
        except BaseException as exc:
            self.requests.forget(request_id)
            if isinstance(exc, asyncio.CancelledError) and validation.cause is not None:
                # Stopped by a forced Unload: say so, as a transition would.
                _current_task().uncancel()
                pending.set_exception(validation.cause)
                raise validation.cause from None
            if isinstance(exc, asyncio.CancelledError):
                pending.cancel()
            else:
                pending.set_exception(exc)
            raise
        finally:
            del self._validating[model_id], self._validated[model_id]
            validated.set_result(None)
        self._models[model_id] = model
        self.bus.publish(EventType.ADDED, model.snapshot())

        async def body() -> int:
            moved = await self.mover.move(model, model.layers, new)
            if target is Tier.HOST:
                model.sleep_level = 1
                model.set_state(ModelState.ASLEEP)
            else:
                model.settle()
            return moved

        plan = Plan(
            TransitionKind.LOAD,
            ModelState.LOADING,
            model.layers,
            body,
            new,
            fail_to=ModelState.FAILED,
        )
        return await self._start(model, plan, call, pending)

    async def sleep(
        self,
        model_id: str,
        level: int = 1,
        *,
        wait: bool = True,
        request_id: str = "",
        disk_copy: bool = False,
    ) -> ModelSnapshot:
        level = level or 1
        if level not in (1, 2):
            raise InvalidArgument(
                f"sleep level must be 1 or 2, not {level}",
                reason="INVALID_SLEEP_LEVEL",
                metadata={"level": level},
            )
        if disk_copy and level != 2:
            raise InvalidArgument("disk_copy goes with sleep level 2", reason="INVALID_ARGUMENT")
        if disk_copy:
            self._need_disk()
        call = Call(request_id, ("sleep", model_id, level, disk_copy), wait)
        if (earlier := self.requests.lookup(request_id, call.fingerprint)) is not None:
            return await self._replay(earlier, wait, model_id)
        model = self._idle_model(model_id)
        if model.state is ModelState.ASLEEP:
            if model.sleep_level == level:
                return model.snapshot()
            if model.sleep_level > level:
                raise FailedPrecondition(
                    f"model {model_id!r} is asleep at level 2 and holds no weights;"
                    " wake it instead of sleeping it at level 1",
                    reason="INVALID_STATE",
                    metadata={"model_id": model_id, "state": model.state.value, "sleep_level": 2},
                )
        elif model.state not in (ModelState.ACTIVE, ModelState.OFFLOADED):
            raise _wrong_state(model, "sleep")
        if level == 1:  # what is on the device goes to HOST; what is in HOST stays
            held = [layer for layer in model.layers if layer.tier is Tier.DEVICE]
        else:
            held = [layer for layer in model.layers if layer.slab is not None]
        new = self.mover.allocate(model, held, Tier.HOST) if level == 1 else []
        if disk_copy:
            self.mover.check_disk_room(model, held)

        async def body() -> int:
            await self._quiesce(model, held)
            if level == 1:
                moved = await self.mover.move(model, held, new)
            else:
                if disk_copy:
                    await self.mover.to_disk(model, held)
                moved = await self.mover.drop(model, held)
            model.sleep_level = level
            model.set_state(ModelState.ASLEEP)
            return moved

        plan = Plan(TransitionKind.SLEEP, ModelState.SLEEPING, held, body, new, sleep_level=level)
        return await self._start(model, plan, call)

    async def wake(
        self, model_id: str, *, wait: bool = True, request_id: str = "", verify: bool = False
    ) -> ModelSnapshot:
        call = Call(request_id, ("wake", model_id, verify), wait)
        if (earlier := self.requests.lookup(request_id, call.fingerprint)) is not None:
            return await self._replay(earlier, wait, model_id)
        model = self._idle_model(model_id)
        if model.state is ModelState.ACTIVE:
            return model.snapshot()
        if model.state not in (ModelState.ASLEEP, ModelState.OFFLOADED):
            raise _wrong_state(model, "wake")
        moving = [layer for layer in model.layers if layer.tier is not Tier.DEVICE]
        plan = self._to_device(model, moving, TransitionKind.WAKE, ModelState.WAKING, verify)
        return await self._start(model, plan, call)

    async def offload(
        self,
        model_id: str,
        layers: Sequence[str] = (),
        tier: Tier = Tier.HOST,
        *,
        wait: bool = True,
        request_id: str = "",
        verify: bool = False,
    ) -> ModelSnapshot:
        if tier is Tier.DISK:
            self._need_disk()
        if tier not in (Tier.HOST, Tier.DEVICE, Tier.DISK):
            raise InvalidArgument(
                f"layers can be offloaded to HOST or DEVICE, not {tier.value}",
                reason="INVALID_TIER",
                metadata={"tier": tier.value},
            )
        names = tuple(dict.fromkeys(layers))
        call = Call(request_id, ("offload", model_id, names, tier, verify), wait)
        if (earlier := self.requests.lookup(request_id, call.fingerprint)) is not None:
            return await self._replay(earlier, wait, model_id)
        model = self._idle_model(model_id)
        unknown = [name for name in names if model.layer(name) is None]
        if unknown:
            known = [layer.plan.name for layer in model.layers]
            raise InvalidArgument(
                f"model {model_id!r} has no layer {some(unknown)};"
                f" its layers are {known[0]} … {known[-1]}",
                reason="UNKNOWN_LAYER",
                metadata={"model_id": model_id, "layers": some(unknown), "count": len(unknown)},
            )
        if model.state not in (ModelState.ACTIVE, ModelState.OFFLOADED):
            raise _wrong_state(model, "offload")
        moving = [
            layer
            for layer in model.layers
            if (not names or layer.plan.name in names) and layer.tier is not tier
        ]
        if not moving:
            return model.snapshot()
        if tier is Tier.DEVICE:
            plan = self._to_device(
                model, moving, TransitionKind.OFFLOAD, ModelState.OFFLOADING, verify
            )
            return await self._start(model, plan, call)
        if tier is Tier.DISK:
            # Only what is in memory: a layer left at its source has nothing to write.
            moving = [layer for layer in moving if layer.slab is not None]
            if not moving:
                return model.snapshot()
            self.mover.check_disk_room(model, moving)

            async def to_disk() -> int:
                await self._quiesce(model, moving)
                await self.mover.to_disk(model, moving)
                freed = await self.mover.drop(model, moving)
                model.settle()
                return freed

            plan = Plan(TransitionKind.OFFLOAD, ModelState.OFFLOADING, moving, to_disk)
            return await self._start(model, plan, call)
        new = self.mover.allocate(model, moving, tier)

        async def body() -> int:
            await self._quiesce(model, moving)
            moved = await self.mover.move(model, moving, new)
            model.settle()
            return moved

        plan = Plan(TransitionKind.OFFLOAD, ModelState.OFFLOADING, moving, body, new)
        return await self._start(model, plan, call)

    def _to_device(
        self,
        model: Model,
        moving: list[LayerState],
        kind: TransitionKind,
        state: ModelState,
        verify: bool,
    ) -> Plan:
        """Wake and Offload to DEVICE: bring `moving` back, from HOST or the source."""
        new = self.mover.allocate(model, moving, Tier.DEVICE)

        async def body() -> int:
            if any(layer.tier is Tier.SOURCE for layer in moving):
                change = await self.mover.blocking(check_unchanged, model.checkpoint)
                if change is not None:
                    raise FailedPrecondition(
                        f"the source of model {model.model_id!r} changed since it was loaded:"
                        f" {change}",
                        reason="SOURCE_CHANGED",
                        metadata={"model_id": model.model_id, "source": model.checkpoint.path},
                    )
            self._unannounced[model.model_id] = ([layer.plan.name for layer in moving], set())
            try:
                moved = await self.mover.move(model, moving, new, verify=verify)
            finally:
                del self._unannounced[model.model_id]
            model.settle()
            return moved

        return Plan(kind, state, moving, body, new)

    async def unload(
        self, model_id: str, *, wait: bool = True, request_id: str = "", force: bool = False
    ) -> ModelSnapshot:
        call = Call(request_id, ("unload", model_id), wait)
        if (earlier := self.requests.lookup(request_id, call.fingerprint)) is not None:
            return await self._replay(earlier, wait, model_id)
        if force and (unloaded := await self._cancel_transition(model_id, request_id)):
            return unloaded
        if model_id in self._validating:
            raise _busy(model_id, "LOADING")
        model = self._idle_model(model_id)

        async def body() -> int:
            await self._quiesce(model, model.layers)
            freed = await self.mover.drop(model, model.layers)
            del self._models[model_id]
            self.mover.forget(model)
            self.engines.unloaded(model_id)
            return freed

        held = [layer for layer in model.layers if layer.slab is not None]
        plan = Plan(
            TransitionKind.UNLOAD,
            ModelState.UNLOADING,
            held,
            body,
            fail_to=ModelState.FAILED,
            removes=True,
        )
        return await self._start(model, plan, call)

    # -- engines ---------------------------------------------------------------

    async def _quiesce(self, model: Model, layers: Sequence[LayerState]) -> None:
        """Before the device slabs of `layers` move or go: every attached engine
        lets go of them (or is detached, which the transition's note says)."""
        names = [layer.plan.name for layer in layers if layer.tier is Tier.DEVICE]
        if not names or not self.engines.attached(model.model_id):
            return
        if model.progress is not None:
            self.mover.set_stage(model, Stage.QUIESCE)
        self._quiesced.setdefault(model.model_id, []).extend(names)
        notes = await self.engines.quiesce(model.model_id, names)
        if notes and model.progress is not None:
            earlier = [model.progress.note] if model.progress.note else []
            model.progress.note = "; ".join([*earlier, *notes])
            self.mover.report(model, force=True)

    def _on_landed(self, model: Model, layer: LayerState) -> None:
        """A layer is on the device: engines may map it. Layers of one file land
        out of order (several are read at once); they are announced in forward
        order, each as soon as it and every layer before it have landed."""
        if layer.slab is None or layer.slab.tier is not Tier.DEVICE:
            return
        pending = self._unannounced.get(model.model_id)
        if pending is None:
            self.engines.resume(model.model_id, [layer.plan.name])
            return
        order, landed = pending
        landed.add(layer.plan.name)
        ready = []
        while order and order[0] in landed:
            ready.append(order.pop(0))
        if ready:
            self.engines.resume(model.model_id, ready)

    async def _retract(self, model: Model, layers: Sequence[LayerState]) -> None:
        await self._quiesce(model, layers)

    def _need_disk(self) -> None:
        if self.disk is None:
            raise FailedPrecondition(
                "no disk cache is configured (disk_cache.path in torpord's config)",
                reason="DISK_CACHE_DISABLED",
            )

    def _disk_keys(self) -> set[str]:
        """Disk copies some model uses: never evicted to make room."""
        return {
            layer.disk.key
            for model in self._models.values()
            for layer in model.layers
            if layer.disk is not None
        }

    async def _cancel_transition(self, model_id: str, request_id: str) -> ModelSnapshot | None:
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
        validation = self._validating.get(model_id)
        if validation is not None:
            log.info("cancelling a load's validation to unload", model_id=model_id)
            validation.cancel(cause)
            await asyncio.wait([validation.task])
            raise NotFound(
                f"model {model_id!r} not found: its Load, still validating the checkpoint,"
                " was cancelled and kept nothing",
                reason="MODEL_NOT_FOUND",
                metadata={"model_id": model_id},
            )
        model = self._model(model_id)
        running = model.running
        if running is None or running.task.done():
            return None
        if model.state is ModelState.UNLOADING:
            await asyncio.wait([running.task])
            if running.task.exception() is None and self._models.get(model_id) is not model:
                return running.task.result()
            return None  # (it failed: this Unload tries again)
        log.info("cancelling a transition to unload", model_id=model_id, state=model.state.value)
        running.cancel(cause)
        await asyncio.wait([running.task])  # (it ends with its error, never cancelled)
        return None

    def _idle_model(self, model_id: str) -> Model:
        """The model, if no transition of it is running (else ABORTED)."""
        model = self._model(model_id)
        if model.busy or model.state.transitional:
            raise _busy(model_id, model.state.value)
        return model

    # -- running transitions ---------------------------------------------------

    async def _start(
        self,
        model: Model,
        plan: Plan,
        call: Call,
        pending: asyncio.Future[ModelSnapshot] | None = None,
    ) -> ModelSnapshot:
        """Enter the plan's state and run it as a task. Nothing here may await
        before the task exists: the model must never look idle while it changes."""
        model.progress = Progress(
            plan.kind, sum(layer.plan.size for layer in plan.layers), len(plan.layers)
        )
        before = (model.state, model.sleep_level)
        if plan.sleep_level is not None:
            model.sleep_level = plan.sleep_level
        model.set_state(plan.state)
        self.bus.publish(EventType.CHANGED, model.snapshot())
        running = Running(
            asyncio.create_task(
                self._run(model, plan, call.request_id, before),
                name=f"{plan.kind.value} {model.model_id}",
            )
        )
        task = running.task
        task.add_done_callback(_retrieve)
        if pending is not None:
            task.add_done_callback(functools.partial(_chain, pending))
        model.running = running
        self.requests.remember(call.request_id, call.fingerprint, task)
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
        bound = log.bind(model_id=model.model_id, transition=plan.kind.value, request_id=request_id)
        bound.info("transition started", bytes=model.progress.bytes_total)
        heartbeat = asyncio.create_task(self._heartbeat(model))
        try:
            if running.cause is not None:  # cancelled before its first step
                raise asyncio.CancelledError
            await plan.body()
        except BaseException as exc:
            err = _as_domain_error(exc, running.cause)
            if isinstance(exc, TorporError | asyncio.CancelledError):
                bound.warning("transition failed", reason=err.reason, error=err.message)
            else:
                bound.exception("transition failed unexpectedly")
            in_use = {id(layer.slab) for layer in model.layers}
            for slab in plan.new:  # allocated for a move that never began (or failed)
                if not slab.freed and id(slab) not in in_use:
                    try:
                        self.backend.free(slab)
                    except Exception:  # (it stays accounted; the rollback goes on)
                        bound.exception("freeing a slab of the failed transition failed")
            if plan.fail_to is None:
                model.sleep_level = before[1]
            model.set_state(plan.fail_to or before[0], err.reason, err.message)
            # Layers engines let go of that are still on the device: theirs again.
            quiesced = set(self._quiesced.pop(model.model_id, ()))
            back = [
                layer.plan.name
                for layer in model.layers
                if layer.plan.name in quiesced and layer.tier is Tier.DEVICE
            ]
            if back and not plan.removes:
                self.engines.resume(model.model_id, back)
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
            )
            self._finish(model, record)
            raise err from exc if err is not exc else None
        finally:
            heartbeat.cancel()
            self._quiesced.pop(model.model_id, None)
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
        )
        bound.info(
            "transition done",
            seconds=round(record.duration, 4),
            bytes=record.bytes,
            freed=record.freed,
            gb_per_s=round(record.bytes_per_second / 1e9, 3),
        )
        if plan.removes:
            model.progress = None
            model.last_transition = record
            model.set_state(ModelState.UNLOADED)  # (what the REMOVED event and the caller see)
            snapshot = model.snapshot()
            self.bus.publish(EventType.REMOVED, snapshot)
            return snapshot
        return self._finish(model, record)

    async def _heartbeat(self, model: Model) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            self.mover.report(model, force=True)

    def _finish(self, model: Model, record: TransitionRecord) -> ModelSnapshot:
        model.progress = None
        model.last_transition = record
        model.update_time = time.time()
        snapshot = model.snapshot()
        self.bus.publish(EventType.CHANGED, snapshot)
        return snapshot

    async def _replay(
        self, task: asyncio.Future[ModelSnapshot], wait: bool, model_id: str
    ) -> ModelSnapshot:
        """The outcome of the first call with this request_id: at once without
        `wait` (once the model exists: a Load may still be validating)."""
        if not wait and not task.done() and model_id in self._validated:
            await asyncio.shield(self._validated[model_id])
        if wait or task.done() or model_id not in self._models:
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
        return self.get(model_id)

    def _on_progress(self, model: Model) -> None:
        if model.progress is not None:
            self.bus.publish(EventType.PROGRESS, model.snapshot())

    def _prepare(self, path: str) -> tuple[Checkpoint, list[LayerState], str]:
        """Open, validate and plan a source, and hash the layout engines will
        map (blocking: on a worker thread)."""
        roots = tuple(str(root) for root in self.settings.allowed_roots)
        with gc_paused():  # (else collections walking its objects stop the loop too)
            checkpoint = open_checkpoint(path, allowed_roots=roots)
            plans = plan_layers(checkpoint, self.settings.patterns, self.settings.alignment)
            if self.disk is not None:  # (remembered: the transitions use them on the loop)
                for plan in plans:
                    cache_key(checkpoint, plan)
            return checkpoint, [LayerState(plan) for plan in plans], layout_hash(plans)

    # -- shutdown --------------------------------------------------------------

    async def close(self, grace: float, *, rollback: float = 5.0) -> bool:
        """Let running transitions finish within `grace` seconds, cancel (and so
        roll back) the rest, then free every slab: all within `rollback`
        seconds more, however the work goes. Work that can't be stopped in
        time (a worker blocked in a read that never returns) is left behind:
        its slabs are not freed under it (the process's exit frees them), and
        the answer is False."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace + rollback

        def left() -> float:
            return max(0.0, deadline - loop.time())

        running = [
            m.task for m in self._models.values() if m.task is not None and not m.task.done()
        ]
        stuck: set[asyncio.Task[ModelSnapshot]] = set()
        if running:
            log.info("waiting for transitions", count=len(running), grace=grace)
            _, pending = await asyncio.wait(running, timeout=grace)
            if pending:
                self.mover.stopping.set()  # workers stop at the next piece
            shutting_down = Aborted("the daemon is shutting down", reason="SHUTTING_DOWN")
            for model in self._models.values():
                if model.running is not None and model.running.task in pending:
                    model.running.cancel(shutting_down)
            if pending:
                _, stuck = await asyncio.wait(pending, timeout=left())
        self.bus.close()
        if stuck:
            names = sorted(task.get_name() for task in stuck)
            log.error(
                "transitions did not stop within the grace period; their memory is left"
                " to the process's exit",
                transitions=names,
            )
            self._executor.shutdown(wait=False, cancel_futures=True)
            return False
        models = list(self._models.values())
        try:
            async with asyncio.timeout(left()):
                await asyncio.gather(*(self._quiesce(model, model.layers) for model in models))
                # Not on the io workers: one of them may be blocked for good.
                slabs = [slab for model in models for slab in model.slabs()]
                for model in models:
                    for layer in model.layers:
                        layer.slab = None
                await asyncio.to_thread(self.mover.free_all, slabs)
        except TimeoutError:
            log.error("freeing the models' memory did not finish within the grace period")
            self._executor.shutdown(wait=False, cancel_futures=True)
            return False
        for model in models:
            self.engines.unloaded(model.model_id)
        self._models.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
        return True


def _check_model_id(model_id: str) -> None:
    if not MODEL_ID.fullmatch(model_id):
        raise InvalidArgument(
            f"invalid model_id {model_id!r}: use 1 to 128 characters of [A-Za-z0-9._-],"
            " starting with a letter or digit",
            reason="INVALID_MODEL_ID",
            metadata={"model_id": model_id},
        )


def _busy(model_id: str, state: str) -> Aborted:
    return Aborted(
        f"model {model_id!r} is {state.lower()}; wait for that to finish",
        reason="TRANSITION_IN_PROGRESS",
        metadata={"model_id": model_id, "state": state},
    )


def _wrong_state(model: Model, verb: str) -> FailedPrecondition:
    hint = " (unload it)" if model.state is ModelState.FAILED else ""
    return FailedPrecondition(
        f"cannot {verb} model {model.model_id!r} while it is {model.state.value.lower()}{hint}",
        reason="INVALID_STATE",
        metadata={"model_id": model.model_id, "state": model.state.value},
    )


def _current_task() -> asyncio.Task[ModelSnapshot]:
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


def _retrieve(task: asyncio.Future[ModelSnapshot]) -> None:
    # A wait=false transition's failure is reported in the model; mark the
    # exception retrieved so asyncio does not log it a second time.
    if not task.cancelled():
        task.exception()
