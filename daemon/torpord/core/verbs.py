"""The five verbs: each checks its arguments and the model's state, plans
the transition and allocates everything it will need (so RESOURCE_EXHAUSTED
is answered before anything changes), then hands it to the runner.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence

from torpord.backends.base import Backend
from torpord.core.announce import Announcer
from torpord.core.events import EventBus, EventType
from torpord.core.images import Images
from torpord.core.model import LayerState, Model, ModelSnapshot, Running
from torpord.core.mover import Mover
from torpord.core.policy import PolicyOverrides
from torpord.core.preempt import idle_for
from torpord.core.registry import Registry, busy, check_model_id, exists, prepare, wrong_state
from torpord.core.requests import RequestLog
from torpord.core.runner import Call, Plan, Runner, current_task, retrieve
from torpord.core.settings import ManagerSettings
from torpord.core.todevice import to_device, to_host
from torpord.errors import FailedPrecondition, InvalidArgument, some
from torpord.storage.safetensors import Checkpoint
from torpord.storage.sources import resolve_source
from torpord.types import Cause, ModelState, Tier, TransitionKind

__all__ = ["ManagerSettings", "Verbs"]


class Verbs:
    def __init__(
        self,
        backend: Backend,
        settings: ManagerSettings,
        bus: EventBus,
        registry: Registry,
        requests: RequestLog,
        runner: Runner,
        announcer: Announcer,
        mover: Mover,
        executor: concurrent.futures.Executor,
        images: Images,
    ) -> None:
        self._backend = backend
        self._settings = settings
        self._bus = bus
        self._registry = registry
        self._requests = requests
        self._runner = runner
        self._announcer = announcer
        self._mover = mover
        self._executor = executor
        self._images = images  # (a forced Unload of an image still being published)

    async def load(
        self,
        model_id: str,
        source: str,
        *,
        device: str = "",
        target: Tier = Tier.DEVICE,
        wait: bool = True,
        request_id: str = "",
        cause: Cause = Cause.USER,
        policy: PolicyOverrides = PolicyOverrides(),  # noqa: B008 - frozen
    ) -> ModelSnapshot:
        """`policy`: checked by the caller (core/policy.py check_policy)."""
        check_model_id(model_id)
        if target not in (Tier.DEVICE, Tier.HOST):
            raise InvalidArgument(
                f"a model can be loaded to DEVICE or HOST, not {target.value}",
                reason="INVALID_TIER",
                metadata={"tier": target.value},
            )
        path = resolve_source(source, self._settings.allowed_roots)
        call = Call(request_id, ("load", model_id, path, device, target, policy), wait, cause)
        if (earlier := self._requests.lookup(request_id, call.fingerprint)) is not None:
            return await self._runner.replay(earlier, wait, model_id)
        existing = self._registry.models.get(model_id)
        if existing is not None:
            if existing.checkpoint.path != path:
                what = f"already exists, {existing.source}"
                raise exists(model_id, what, existing.checkpoint.path)
            if existing.state is ModelState.LOADING and existing.task is not None:
                self._take_policy(existing, policy)
                return await self._runner.replay(existing.task, wait, model_id)
            if existing.busy or existing.state.transitional:
                raise busy(model_id, existing.state.value)
            self._take_policy(existing, policy)
            return existing.snapshot()
        if (loading := self._registry.validating.get(model_id)) is not None:
            if loading.source != path:  # (the same source: see core/loads.py)
                what = f"is being loaded ({loading.cause.value}) with source {loading.source}"
                raise exists(model_id, f"{what}; wait for it, then unload it first", loading.source)
            raise busy(model_id, "LOADING")
        uuid = self._backend.resolve_device(device) if device else ""
        # A retry that comes while the checkpoint is being validated waits for this.
        pending: asyncio.Future[ModelSnapshot] = asyncio.get_running_loop().create_future()
        pending.add_done_callback(retrieve)
        self._requests.remember(request_id, call.fingerprint, pending)
        # This call's task, so a forced Unload can stop the validation.
        validation = Running(current_task(), started=True)
        validated = self._registry.validate(model_id, validation, path, cause).done
        try:
            # Not through mover.blocking: nothing is written into a slab here,
            # so a cancelled call need not wait for the worker to finish.
            # Parsing and planning are O(tensors): off the event loop.
            checkpoint, layers, layout = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._prepare, path
            )
            model = Model(model_id, checkpoint, uuid or self._backend.pick_device(), layers)
            model.layout_hash = layout
            self._registry.adopt(model, policy)
            new = self._mover.allocate(model, model.layers, target)
        except BaseException as exc:
            self._requests.forget(request_id)
            if isinstance(exc, asyncio.CancelledError) and validation.cause is not None:
                # Stopped by a forced Unload: say so, as a transition would.
                current_task().uncancel()
                pending.set_exception(validation.cause)
                raise validation.cause from None
            if isinstance(exc, asyncio.CancelledError):
                pending.cancel()
            else:
                pending.set_exception(exc)
            raise
        finally:
            del self._registry.validating[model_id]
            validated.set_result(None)
        self._registry.add(model)
        self._bus.publish(EventType.ADDED, model.snapshot())

        async def body() -> int:
            moved = await self._mover.move(model, model.layers, new)
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
        return await self._runner.start(model, plan, call, pending)

    async def sleep(
        self,
        model_id: str,
        level: int = 1,
        *,
        wait: bool = True,
        request_id: str = "",
        disk_copy: bool = False,
        cause: Cause = Cause.USER,
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
        call = Call(request_id, ("sleep", model_id, level, disk_copy), wait, cause)
        if (earlier := self._requests.lookup(request_id, call.fingerprint)) is not None:
            return await self._runner.replay(earlier, wait, model_id)
        model = await idle_for(self._registry, model_id, cause)
        if model.state is ModelState.ASLEEP:
            if model.sleep_level == level:
                # (A caller's ask for where a policy put it: it stays there.)
                model.placed_by_caller |= cause is Cause.USER
                return model.snapshot()
            if model.sleep_level > level:  # its weights back to host memory
                return await self._runner.start(model, to_host(self._mover, model), call)
        elif model.state not in (ModelState.ACTIVE, ModelState.OFFLOADED):
            raise wrong_state(model, "sleep")
        if level == 2 and model.fingerprint:  # (an image: only its disk copy can bring it back)
            self._need_disk(
                f"model {model_id!r} is an image: it has no source to reload from, so"
                " level-2 sleep keeps a disk copy of it, and"
            )
            disk_copy = True
        if level == 1:  # what is on the device goes to HOST; what is in HOST stays
            held = [layer for layer in model.layers if layer.tier is Tier.DEVICE]
        else:
            held = [layer for layer in model.layers if layer.slab is not None]
        new = self._mover.allocate(model, held, Tier.HOST) if level == 1 else []
        if disk_copy:
            self._mover.check_disk_room(model, held)

        async def body() -> int:
            await self._announcer.quiesce(model, held)
            if level == 1:
                moved = await self._mover.move(model, held, new)
            else:
                if disk_copy:
                    await self._mover.to_disk(model, held)
                moved = await self._mover.drop(model, held)
            model.sleep_level = level
            model.set_state(ModelState.ASLEEP)
            return moved

        plan = Plan(TransitionKind.SLEEP, ModelState.SLEEPING, held, body, new, sleep_level=level)
        return await self._runner.start(model, plan, call)

    async def wake(
        self,
        model_id: str,
        *,
        wait: bool = True,
        request_id: str = "",
        verify: bool = False,
        cause: Cause = Cause.USER,
    ) -> ModelSnapshot:
        call = Call(request_id, ("wake", model_id, verify), wait, cause)
        if (earlier := self._requests.lookup(request_id, call.fingerprint)) is not None:
            return await self._runner.replay(earlier, wait, model_id)
        model = await idle_for(self._registry, model_id, cause)
        if model.state is ModelState.ACTIVE:
            return model.snapshot()
        if model.state not in (ModelState.ASLEEP, ModelState.OFFLOADED):
            raise wrong_state(model, "wake")
        moving = [layer for layer in model.layers if layer.tier is not Tier.DEVICE]
        plan = to_device(
            self._mover,
            self._announcer,
            model,
            moving,
            TransitionKind.WAKE,
            ModelState.WAKING,
            verify,
        )
        return await self._runner.start(model, plan, call)

    async def offload(
        self,
        model_id: str,
        layers: Sequence[str] = (),
        tier: Tier = Tier.HOST,
        *,
        wait: bool = True,
        request_id: str = "",
        verify: bool = False,
        cause: Cause = Cause.USER,
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
        call = Call(request_id, ("offload", model_id, names, tier, verify), wait, cause)
        if (earlier := self._requests.lookup(request_id, call.fingerprint)) is not None:
            return await self._runner.replay(earlier, wait, model_id)
        model = await idle_for(self._registry, model_id, cause)
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
            raise wrong_state(model, "offload")
        moving = [
            layer
            for layer in model.layers
            if (not names or layer.plan.name in names) and layer.tier is not tier
        ]
        if not moving:
            return model.snapshot()
        if tier is Tier.DEVICE:
            plan = to_device(
                self._mover,
                self._announcer,
                model,
                moving,
                TransitionKind.OFFLOAD,
                ModelState.OFFLOADING,
                verify,
            )
            return await self._runner.start(model, plan, call)
        if tier is Tier.DISK:
            # Only what is in memory: a layer left at its source has nothing to write.
            moving = [layer for layer in moving if layer.slab is not None]
            if not moving:
                return model.snapshot()
            self._mover.check_disk_room(model, moving)

            async def to_disk() -> int:
                await self._announcer.quiesce(model, moving)
                await self._mover.to_disk(model, moving)
                freed = await self._mover.drop(model, moving)
                model.settle()
                return freed

            plan = Plan(
                TransitionKind.OFFLOAD, ModelState.OFFLOADING, moving, to_disk, target=Tier.DISK
            )
            return await self._runner.start(model, plan, call)
        new = self._mover.allocate(model, moving, tier)

        async def body() -> int:
            await self._announcer.quiesce(model, moving)
            moved = await self._mover.move(model, moving, new)
            model.settle()
            return moved

        plan = Plan(TransitionKind.OFFLOAD, ModelState.OFFLOADING, moving, body, new, target=tier)
        return await self._runner.start(model, plan, call)

    async def unload(
        self,
        model_id: str,
        *,
        wait: bool = True,
        request_id: str = "",
        force: bool = False,
        cause: Cause = Cause.USER,
    ) -> ModelSnapshot:
        call = Call(request_id, ("unload", model_id), wait, cause)
        if (earlier := self._requests.lookup(request_id, call.fingerprint)) is not None:
            return await self._runner.replay(earlier, wait, model_id)
        if force and (unloaded := await self._runner.cancel(model_id, request_id)):
            return unloaded
        if model_id in self._registry.validating:
            raise busy(model_id, "LOADING")
        if force and (gone := self._images.stop(model_id)):
            return gone
        model = await idle_for(self._registry, model_id, cause)

        async def body() -> int:
            await self._mover.disk_tier.forget_image(model)  # (first: it may fail)
            await self._announcer.quiesce(model, model.layers)
            freed = await self._mover.drop(model, model.layers)
            self._registry.remove(model_id)
            self._announcer.forget(model)
            self._announcer.engines.unloaded(model_id)
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
        return await self._runner.start(model, plan, call)

    def _take_policy(self, model: Model, policy: PolicyOverrides) -> None:
        """A Load of a loaded model: the policy fields it sets, set (as the
        model's first Load would have; its catalogue entry keeps its own)."""
        new = policy.over(model.policy)
        if new != model.policy:
            model.policy = new
            self._bus.publish(EventType.CHANGED, model.snapshot())

    def _need_disk(self, why: str = "") -> None:
        if self._mover.disk is None:
            raise FailedPrecondition(
                f"{why}{' n' if why else 'N'}o disk cache is configured"
                " (disk_cache.path in torpord's config)",
                reason="IMAGE_NEEDS_DISK_CACHE" if why else "DISK_CACHE_DISABLED",
            )

    def _prepare(self, path: str) -> tuple[Checkpoint, list[LayerState], str]:
        settings = self._settings
        return prepare(
            path,
            settings.allowed_roots,
            settings.patterns,
            settings.alignment,
            disk=self._mover.disk is not None,
        )
