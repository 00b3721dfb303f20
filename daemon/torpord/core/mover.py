"""Moving a model's layers between tiers: all-or-nothing, in forward order.

Every move allocates all its destination slabs first (so running out of memory
is found before anything changes), fills them one layer at a time in forward
layer order (each layer points at its new slab as soon as it is filled, the
basis of progressive wake), and only then frees the old slabs. If anything
fails part-way the layers point back at their old slabs and every new slab is
freed, so the model is exactly as it was.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import xxhash

from torpord.backends.base import Backend, Slab, SlabOwner
from torpord.core.model import LayerState, Model, Progress
from torpord.core.types import Stage, Tier
from torpord.errors import Aborted, DataLoss, FailedPrecondition
from torpord.storage.safetensors import TensorInfo, read_tensors

__all__ = ["Mover", "checksum"]

T = TypeVar("T")

# Progress is published at most this often (and at every stage change).
PROGRESS_INTERVAL = 0.25
# A layer is read in runs of tensors of about this many bytes; progress moves
# after each run.
READ_RUN = 32 * 2**20


def checksum(view: memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(view)


class Mover:
    def __init__(
        self,
        backend: Backend,
        executor: concurrent.futures.Executor,
        on_progress: Callable[[Model], None],
    ) -> None:
        self._backend = backend
        self._executor = executor
        self._on_progress = on_progress
        self._last_publish: dict[int, float] = {}
        # Set on shutdown once the grace period is over: a worker in the middle
        # of a big layer stops at its next piece instead of finishing the layer.
        self.stopping = threading.Event()

    async def blocking(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn on a worker thread. If the caller is cancelled, still wait for
        the thread to finish: it may be writing into a slab we are about to free."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, functools.partial(fn, *args))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():  # however often we are cancelled meanwhile
                try:
                    await asyncio.shield(future)
                except asyncio.CancelledError:
                    continue
                except BaseException:
                    break
            raise

    def report(self, model: Model, *, force: bool = False) -> None:
        now = time.monotonic()
        last = self._last_publish.get(id(model), 0.0)
        if force or now - last >= PROGRESS_INTERVAL:
            self._last_publish[id(model)] = now
            self._on_progress(model)

    def _check_stopping(self) -> None:
        if self.stopping.is_set():
            raise Aborted("the daemon is shutting down", reason="SHUTTING_DOWN")

    def set_stage(self, model: Model, stage: Stage) -> None:
        assert model.progress is not None
        model.progress.stage = stage
        self.report(model, force=True)

    # -- bytes of one layer --------------------------------------------------

    def _read_layer(
        self, model: Model, layer: LayerState, slab: Slab, on_bytes: Callable[[int], None]
    ) -> str:
        """Read a layer from the source into slab (worker thread); its checksum."""
        with self._backend.view(slab) as view:
            end = 0
            for packed in layer.plan.tensors:
                # Alignment padding is zeroed so that a slab's checksum depends
                # only on its tensors, whatever the allocator handed out.
                view[end : packed.slab_offset] = bytes(packed.slab_offset - end)
                end = packed.slab_offset + packed.tensor.nbytes
            view[end:] = bytes(len(view) - end)
            # In runs of about READ_RUN bytes, so progress moves within a big layer.
            run: list[tuple[TensorInfo, int]] = []
            size = 0
            for packed in layer.plan.tensors:
                run.append((packed.tensor, packed.slab_offset))
                size += packed.tensor.nbytes
                if size >= READ_RUN or packed is layer.plan.tensors[-1]:
                    self._check_stopping()
                    read_tensors(model.checkpoint, run, view)
                    on_bytes(size)
                    run, size = [], 0
            return checksum(view)

    async def fill(
        self, model: Model, layer: LayerState, slab: Slab, *, verify: bool = False
    ) -> None:
        """Fill slab with layer's bytes, from its current slab or the source.
        Bytes read from the source are always checked against the layer's
        checksum (once it has one); copied bytes when `verify` is asked."""
        assert model.progress is not None
        progress = model.progress
        size = layer.plan.size

        def on_bytes(n: int) -> None:  # called on the worker thread
            progress.bytes_done += n
            self._check_stopping()

        if layer.slab is not None:
            with progress.phase(Stage.TRANSFER, size):
                await self.blocking(self._backend.copy, layer.slab, slab, on_bytes)
            if verify:
                with progress.phase(Stage.VERIFY, size):
                    digest = await self.blocking(self._backend.checksum, slab)
                if digest != layer.checksum:
                    raise DataLoss(
                        f"layer {layer.plan.name} of model {model.model_id!r} arrived with"
                        f" checksum {digest}, expected {layer.checksum}: its {layer.tier.value}"
                        " copy is corrupt; nothing corrupt was made active",
                        reason="CHECKSUM_MISMATCH",
                        metadata={
                            "model_id": model.model_id,
                            "layer": layer.plan.name,
                            "expected": layer.checksum,
                            "actual": digest,
                        },
                    )
            return
        with progress.phase(Stage.READ, size):
            digest = await self.blocking(self._read_layer, model, layer, slab, on_bytes)
        if not layer.checksum:
            layer.checksum = digest
        elif digest != layer.checksum:
            raise FailedPrecondition(
                f"layer {layer.plan.name} of the source {model.checkpoint.path} no longer has"
                f" the bytes it had at load (checksum {digest}, expected {layer.checksum})",
                reason="SOURCE_CHANGED",
                metadata={"model_id": model.model_id, "layer": layer.plan.name},
            )

    # -- moves ---------------------------------------------------------------

    def allocate(self, model: Model, layers: Sequence[LayerState], tier: Tier) -> list[Slab]:
        device = model.device if tier is Tier.DEVICE else None
        return self._backend.allocate(
            tier,
            device,
            [(layer.plan.size, SlabOwner(model.model_id, layer.plan.name)) for layer in layers],
        )

    async def move(
        self,
        model: Model,
        layers: Sequence[LayerState],
        new: Sequence[Slab],
        *,
        verify: bool = False,
    ) -> int:
        """Fill `new` (allocated by `allocate` for `layers`, in forward order)
        and make the layers use it; returns the bytes moved. On failure the
        layers keep their old slabs and every slab of `new` is freed."""
        assert model.progress is not None
        old = [layer.slab for layer in layers]
        progress: Progress = model.progress
        progress.stage = Stage.READ if any(s is None for s in old) else Stage.TRANSFER
        self.report(model, force=True)
        done = progress.bytes_done
        try:
            for layer, slab in zip(layers, new, strict=True):
                await self.fill(model, layer, slab, verify=verify)
                layer.slab = slab
                done += layer.plan.size
                progress.bytes_done = done  # exact, whatever the pieces added up to
                progress.layers_done += 1
                self.report(model)
        except BaseException:
            for layer, previous in zip(layers, old, strict=True):
                layer.slab = previous
            for slab in new:
                if not slab.freed:
                    self._backend.free(slab)
            raise
        self.set_stage(model, Stage.RELEASE)
        await self.blocking(self._free_all, [slab for slab in old if slab is not None])
        return sum(layer.plan.size for layer in layers)

    async def drop(self, model: Model, layers: Sequence[LayerState]) -> int:
        """Free the slabs of `layers`; they are then only in the source."""
        slabs = [layer.slab for layer in layers if layer.slab is not None]
        for layer in layers:
            layer.slab = None
        await self.blocking(self._free_all, slabs)
        return sum(slab.size for slab in slabs)

    def _free_all(self, slabs: Sequence[Slab]) -> None:
        # On a worker thread: unmapping gigabytes of touched pages takes a
        # while, and the event loop must keep answering meanwhile.
        for slab in slabs:
            self._backend.free(slab)

    def forget(self, model: Model) -> None:
        self._last_publish.pop(id(model), None)
