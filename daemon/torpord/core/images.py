"""Images: models whose bytes an engine wrote and published.

An attached engine that has its final weights (fused, sharded, quantized:
whatever it computes from a checkpoint) publishes them once: `begin` checks
its catalogue (torpord.storage.catalogue), allocates a DEVICE slab per group
(all or nothing, charged like any model's) and creates the model in state
PUBLISHING, writable by that one attachment only. `commit` is a transition
(PUBLISH): each slab is sealed (backend.seal: no process can change it from
then on) and checksummed, and the model is ACTIVE like a loaded one. An
engine that goes away before its commit leaves nothing: `abandon` frees the
slabs and removes the model. A later engine finds the image by its
fingerprint (`find`) and attaches to it instead of loading.

An image has no source: what level-2 sleep or an offload to DISK would drop
must first have a disk copy (torpord.core.verbs keeps to that).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence

import structlog

from torpord.backends.base import Backend
from torpord.core.announce import Announcer
from torpord.core.events import EventBus, EventType
from torpord.core.model import LayerState, Model, ModelSnapshot
from torpord.core.mover import Mover
from torpord.core.registry import Registry, check_model_id
from torpord.core.runner import Call, Plan, Runner
from torpord.errors import AlreadyExists, FailedPrecondition
from torpord.storage.catalogue import CatalogueGroup, check_fingerprint, plan_image
from torpord.storage.layers import LayerPlan, layout_hash
from torpord.storage.safetensors import Checkpoint
from torpord.types import ModelState, Stage, Tier, TransitionKind

__all__ = ["Images"]

log = structlog.get_logger("torpord.core")


class Images:
    def __init__(
        self,
        backend: Backend,
        bus: EventBus,
        registry: Registry,
        runner: Runner,
        announcer: Announcer,
        mover: Mover,
        executor: concurrent.futures.Executor,
    ) -> None:
        self._backend = backend
        self._bus = bus
        self._registry = registry
        self._runner = runner
        self._announcer = announcer
        self._mover = mover
        self._executor = executor
        # Abandoned images' slabs being freed, on workers.
        self.freeing: set[asyncio.Future[None]] = set()

    def find(self, fingerprint: str) -> ModelSnapshot | None:
        """The image with this fingerprint, if the daemon holds one."""
        check_fingerprint(fingerprint)
        model = self._by_fingerprint(fingerprint)
        return model.snapshot() if model is not None else None

    def _by_fingerprint(self, fingerprint: str) -> Model | None:
        for model in self._registry.models.values():
            if model.fingerprint == fingerprint:
                return model
        return None

    async def begin(
        self,
        model_id: str,
        fingerprint: str,
        groups: Sequence[CatalogueGroup],
        *,
        device: str,
        publisher: str,
    ) -> Model:
        """The new model, PUBLISHING, with a DEVICE slab per group that only
        `publisher` (an attachment id) may write."""
        check_model_id(model_id)
        check_fingerprint(fingerprint)
        self._check_free(model_id, fingerprint)
        # O(tensors): off the event loop.
        checkpoint, plans, layout = await asyncio.get_running_loop().run_in_executor(
            self._executor, _plan, fingerprint, list(groups)
        )
        self._check_free(model_id, fingerprint)  # (again: others ran meanwhile)
        uuid = self._backend.resolve_device(device) if device else self._backend.pick_device()
        model = Model(model_id, checkpoint, uuid, [LayerState(plan) for plan in plans])
        model.layout_hash = layout
        self._registry.adopt(model)
        slabs = self._mover.allocate(model, model.layers, Tier.DEVICE)  # (all or nothing)
        for layer, slab in zip(model.layers, slabs, strict=True):
            layer.slab = slab
        model.publisher = publisher
        model.set_state(ModelState.PUBLISHING)
        self._registry.add(model)
        self._bus.publish(EventType.ADDED, model.snapshot())
        log.info(
            "publishing an image",
            model_id=model_id,
            groups=len(plans),
            bytes=sum(plan.size for plan in plans),
        )
        return model

    def _check_free(self, model_id: str, fingerprint: str) -> None:
        if model_id in self._registry.models or model_id in self._registry.validating:
            raise AlreadyExists(
                f"model {model_id!r} already exists",
                reason="MODEL_EXISTS",
                metadata={"model_id": model_id},
            )
        same = self._by_fingerprint(fingerprint)
        if same is not None:
            raise AlreadyExists(
                f"model {same.model_id!r} is already the image with this fingerprint: attach to it",
                reason="IMAGE_EXISTS",
                metadata={"model_id": same.model_id},
            )

    async def commit(self, model_id: str, publisher: str) -> ModelSnapshot:
        """Seal and checksum every slab the publisher wrote; the model is then
        ACTIVE. A failure leaves it FAILED (and `abandon` removes it)."""
        model = self._registry.model(model_id)
        if model.publisher != publisher or model.state is not ModelState.PUBLISHING or model.busy:
            raise FailedPrecondition(
                f"model {model_id!r} is not being published by this engine",
                reason="NOT_PUBLISHING",
                metadata={"model_id": model_id, "state": model.state.value},
            )
        layers = list(model.layers)

        async def body() -> int:
            assert model.progress is not None
            self._mover.set_stage(model, Stage.VERIFY)
            # Every seal ends before the commit does, failed or cancelled: a
            # plain gather would raise at the first failure while the others
            # still remap slabs that the rollback then frees.
            sealed = await asyncio.gather(
                *(self._mover.blocking(self._seal, layer) for layer in layers),
                return_exceptions=True,
            )
            for result in sealed:
                if isinstance(result, BaseException):
                    raise result
            for layer, checksum in zip(layers, sealed, strict=True):
                assert isinstance(checksum, str)
                layer.checksum = checksum
                model.progress.bytes_done += layer.plan.size  # (checksummed: the record's bytes)
                model.progress.layers_done += 1
            model.publisher = ""
            model.settle()
            return sum(layer.plan.size for layer in layers)

        plan = Plan(
            TransitionKind.PUBLISH, ModelState.PUBLISHING, layers, body, fail_to=ModelState.FAILED
        )
        return await self._runner.start(model, plan, Call("", ("publish", model_id), True))

    def _seal(self, layer: LayerState) -> str:
        """(On a worker.) Seal the layer's slab, then take its checksum: the
        bytes can't change after the seal, so the checksum holds for good."""
        assert layer.slab is not None
        self._backend.seal(layer.slab)
        return self._backend.checksum(layer.slab)

    def stop(self, model_id: str) -> ModelSnapshot | None:
        """A forced Unload of an image still being written: its engine's
        stream ends and nothing is kept. None if it is not one (or its
        commit is running: the Unload then goes as for any transition)."""
        model = self._registry.find(model_id)
        if model is None or model.state is not ModelState.PUBLISHING or model.busy:
            return None
        self.abandon(model_id, model.publisher)
        self._announcer.engines.unloaded(model_id)
        return model.snapshot()

    def abandon(self, model_id: str, publisher: str) -> None:
        """The publisher went away: if it had not committed, the model and its
        slabs go (after a commit still running, if that fails)."""
        model = self._registry.find(model_id)
        if model is None or model.publisher != publisher:
            return
        if model.busy:
            assert model.task is not None
            model.task.add_done_callback(lambda _: self.abandon(model_id, publisher))
            return
        slabs = model.slabs()
        for layer in model.layers:
            layer.slab = None
        self._registry.remove(model_id)
        self._announcer.forget(model)
        model.set_state(
            ModelState.UNLOADED,
            "PUBLISH_ABANDONED",
            "its engine went away before committing the image",
        )
        self._bus.publish(EventType.REMOVED, model.snapshot())
        log.info("publishing abandoned: the image is gone", model_id=model_id)
        # (Freeing gigabytes takes a while: on a worker, off the event loop.)
        freeing = asyncio.get_running_loop().run_in_executor(
            self._executor, self._mover.free_all, slabs
        )
        self.freeing.add(freeing)  # (shutdown waits for them: see ModelManager.close)
        freeing.add_done_callback(self.freeing.discard)
        freeing.add_done_callback(_log_failure)


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.error("freeing an abandoned image's slabs failed", error=str(exc))


def _plan(
    fingerprint: str, groups: list[CatalogueGroup]
) -> tuple[Checkpoint, tuple[LayerPlan, ...], str]:
    checkpoint, plans = plan_image(fingerprint, groups)
    return checkpoint, plans, layout_hash(plans)
