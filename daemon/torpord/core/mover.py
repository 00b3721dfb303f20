"""Moving a model's layers between tiers: all-or-nothing, in forward order.

Every move allocates all its destination slabs first (so running out of memory
is found before anything changes), fills them (from the source through the
parallel read pipeline, from other slabs one layer at a time in forward
order; each layer points at its new slab as soon as it is filled, the basis
of progressive wake), and only then frees the old slabs. If anything fails
part-way the layers point back at their old slabs and every new slab is
freed, so the model is exactly as it was.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import structlog

from torpord.backends.base import Backend, Slab, SlabOwner
from torpord.core.model import LayerState, Model, Progress
from torpord.errors import (
    Aborted,
    DataLoss,
    FailedPrecondition,
    ResourceExhausted,
    TorporError,
    Unavailable,
)
from torpord.storage.diskcache import (
    DATA_OFFSET,
    DiskCache,
    DiskEntry,
    FilesystemFull,
    Reservation,
    cache_key,
)
from torpord.storage.pipeline import ReadOptions, StopRequested, read_layers
from torpord.storage.reader import check_unchanged
from torpord.types import Stage, Tier

__all__ = ["Mover"]

log = structlog.get_logger("torpord.core")

T = TypeVar("T")

# Progress is published at most this often (and at every stage change).
PROGRESS_INTERVAL = 0.25
# Layers written to the disk cache at once.
DISK_WRITERS = 4


async def settle(awaitable: Awaitable[T], on_cancel: Callable[[], object] | None = None) -> T:
    """Await `awaitable` to its end even if the caller is cancelled meanwhile
    (however often); then raise the cancellation. For work that must not be
    abandoned halfway: a copy into a slab about to be freed, engines letting go
    of a slab before it is freed. `on_cancel` is called at the first
    cancellation (to ask the work to stop early, where it can)."""
    future = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if future.cancelled():  # the work itself was cancelled, not just us
            raise
        if on_cancel is not None:
            on_cancel()
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                continue
            except BaseException:
                break
        raise


class Mover:
    def __init__(
        self,
        backend: Backend,
        executor: concurrent.futures.Executor,
        on_progress: Callable[[Model], None],
        read_options: ReadOptions | None = None,
        disk: DiskCache | None = None,
        *,
        on_landed: Callable[[Model, LayerState], None] | None = None,
        retract: Callable[[Model, Sequence[LayerState]], Awaitable[None]] | None = None,
        disk_in_use: Callable[[], set[str]] = set,
    ) -> None:
        self._backend = backend
        # A layer points at a new slab (progressive wake: engines may map it).
        self._on_landed = on_landed or (lambda model, layer: None)
        # A failed move is about to free the new slabs of these layers, which
        # on_landed announced: engines must let go of them first.
        self._retract = retract
        self.disk = disk
        # The keys of the disk copies models use: never evicted, never removed.
        self._disk_in_use = disk_in_use
        self.read_options = read_options or ReadOptions()
        self._executor = executor
        self._on_progress = on_progress
        self._last_publish: dict[int, float] = {}
        # Set on shutdown once the grace period is over: a worker in the middle
        # of a big layer stops at its next piece instead of finishing the layer.
        self.stopping = threading.Event()

    async def blocking(
        self, fn: Callable[..., T], *args: object, on_cancel: Callable[[], object] | None = None
    ) -> T:
        """Run fn on a worker thread. If the caller is cancelled, still wait for
        the thread to finish: it may be writing into a slab we are about to free
        (`on_cancel` may ask it to finish early)."""
        loop = asyncio.get_running_loop()
        return await settle(
            loop.run_in_executor(self._executor, functools.partial(fn, *args)), on_cancel
        )

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

    async def _read_source(
        self, model: Model, layers: Sequence[LayerState], slabs: Sequence[Slab]
    ) -> None:
        """Read `layers` from the source into `slabs` through the pipeline; each
        layer points at its slab as soon as it has landed and checked out."""
        assert model.progress is not None
        progress = model.progress
        loop = asyncio.get_running_loop()
        mismatch: list[FailedPrecondition] = []
        abort = threading.Event()

        def landed(index: int, digest: str) -> None:  # on the event loop
            layer = layers[index]
            if not layer.checksum:
                layer.checksum = digest
            elif digest != layer.checksum:
                mismatch.append(
                    FailedPrecondition(
                        f"layer {layer.plan.name} of the source {model.checkpoint.path} no"
                        f" longer has the bytes it had at load (checksum {digest},"
                        f" expected {layer.checksum})",
                        reason="SOURCE_CHANGED",
                        metadata={"model_id": model.model_id, "layer": layer.plan.name},
                    )
                )
                abort.set()
                return
            layer.slab = slabs[index]
            progress.layers_done += 1
            self._on_landed(model, layer)
            self.report(model)

        def on_layer(index: int, digest: str) -> None:  # on a read worker
            loop.call_soon_threadsafe(landed, index, digest)

        def on_bytes(n: int) -> None:
            progress.bytes_done += n

        sinks = [self._backend.sink(slab) for slab in slabs]
        size = sum(layer.plan.size for layer in layers)
        try:
            report = await self.blocking(
                functools.partial(
                    read_layers,
                    model.checkpoint,
                    [layer.plan for layer in layers],
                    sinks,
                    self.read_options,
                    on_bytes=on_bytes,
                    on_layer=on_layer,
                    should_stop=lambda: self.stopping.is_set() or abort.is_set(),
                    staging=self._backend.staging(),
                ),
                on_cancel=abort.set,  # (cancelled: the readers stop at their next chunk)
            )
        except StopRequested:
            if mismatch:
                raise mismatch[0] from None
            raise Aborted("the daemon is shutting down", reason="SHUTTING_DOWN") from None
        if mismatch:  # the last layer, after which nothing was left to stop
            raise mismatch[0]
        progress.add_phase(Stage.READ, report.read, size)
        if report.transfer_bytes:
            progress.add_phase(Stage.TRANSFER, report.transfer, report.transfer_bytes)
        progress.add_phase(Stage.VERIFY, report.checksum, size)
        for note in report.notes:
            log.warning("read path", model_id=model.model_id, note=note)
        if report.notes:
            progress.note = "; ".join(report.notes)
            self.report(model, force=True)

    async def copy(self, model: Model, layer: LayerState, slab: Slab, *, verify: bool) -> None:
        """Copy layer's current slab into slab; with `verify`, check the bytes
        that arrived against the layer's checksum."""
        assert model.progress is not None and layer.slab is not None
        progress = model.progress
        size = layer.plan.size

        def on_bytes(n: int) -> None:  # called on the worker thread
            progress.bytes_done += n
            self._check_stopping()

        with progress.phase(Stage.TRANSFER, size):
            await self.blocking(self._backend.copy, layer.slab, slab, on_bytes)
        if not verify:
            return
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
        try:
            from_disk = [i for i, layer in enumerate(layers) if self._disk_copy(model, layer)]
            if from_disk:
                await self._read_disk(
                    model, [layers[i] for i in from_disk], [new[i] for i in from_disk]
                )
            from_source = [i for i, layer in enumerate(layers) if layer.slab is None]
            if from_source:
                await self._read_source(
                    model, [layers[i] for i in from_source], [new[i] for i in from_source]
                )
            done = progress.bytes_done
            for layer, slab in zip(layers, new, strict=True):
                if layer.slab is slab:  # read from the disk or the source above
                    continue
                await self.copy(model, layer, slab, verify=verify)
                layer.slab = slab
                done += layer.plan.size
                progress.bytes_done = done  # exact, whatever the pieces added up to
                progress.layers_done += 1
                self._on_landed(model, layer)
                self.report(model)
            progress.bytes_done = progress.bytes_total
        except BaseException:
            landed = [
                layer
                for layer, slab in zip(layers, new, strict=True)
                if layer.slab is slab and slab.tier is Tier.DEVICE
            ]
            try:
                if landed and self._retract is not None:
                    # Engines let go of the new slabs before they are freed,
                    # however often this task is cancelled meanwhile.
                    await settle(self._retract(model, landed))
            except BaseException:
                log.exception("engines could not be asked to let go", model_id=model.model_id)
            finally:
                for layer, previous in zip(layers, old, strict=True):
                    layer.slab = previous
                for slab in new:
                    if not slab.freed:
                        try:
                            self._backend.free(slab)
                        except Exception:  # (it stays accounted; the first error stands)
                            log.exception("freeing a new slab of a failed move failed")
            raise
        self.set_stage(model, Stage.RELEASE)
        freed = [slab for slab in old if slab is not None]
        # Device memory must really be free when the transition returns (another
        # model may be waiting for it); host pool memory may finish in the background.
        try:
            await self.blocking(
                self.free_all, freed, any(slab.tier is Tier.DEVICE for slab in freed)
            )
        except Exception:
            # The layers are in their new slabs already: the move is done. What
            # could not be freed stays accounted (and logged), never referenced.
            log.exception("the old slabs of a finished move were not all freed")
        return sum(layer.plan.size for layer in layers)

    # -- the disk tier -------------------------------------------------------------

    def _disk_copy(self, model: Model, layer: LayerState) -> bool:
        """Whether a layer not in memory comes from the disk cache: its own copy
        (even one the cache has lost since: _read_disk then falls back to the
        source), or one a previous load of the same source left there."""
        if layer.slab is not None or self.disk is None:
            return False
        if layer.disk is None:
            layer.disk = self.disk.get(cache_key(model.checkpoint, layer.plan))
        return layer.disk is not None

    async def _read_disk(
        self, model: Model, layers: Sequence[LayerState], slabs: Sequence[Slab]
    ) -> None:
        """Fill the layers' slabs from their disk copies. A layer whose copy is
        lost (dropped from the cache) or can't be read right now is left
        unfilled for the source to fill, once the source is found unchanged."""
        assert model.progress is not None and self.disk is not None
        progress = model.progress
        fallen: list[tuple[LayerState, TorporError]] = []
        for layer, slab in zip(layers, slabs, strict=True):
            assert layer.disk is not None
            self._check_stopping()
            # The cache may hold a newer entry for the key (the same bytes: the
            # key is the source's identity), or none: removed as corrupt through
            # another model sharing it, or evicted.
            entry = self.disk.get(layer.disk.key)
            try:
                if entry is None:
                    raise DataLoss(
                        f"the disk copy of layer {layer.plan.name} is no longer in the cache",
                        reason="CACHE_ENTRY_LOST",
                    )
                if layer.checksum and entry.checksum != layer.checksum:
                    self.disk.remove(entry)
                    raise DataLoss(
                        f"the disk copy of layer {layer.plan.name} holds other bytes than the"
                        f" model's (checksum {entry.checksum}, expected {layer.checksum})",
                        reason="CACHE_CORRUPT",
                    )
                with progress.phase(Stage.READ, layer.plan.size):
                    await self.blocking(
                        self.disk.read_into, entry, self._backend.sink(slab), layer.plan.name
                    )
            except (DataLoss, Unavailable) as err:
                if isinstance(err, DataLoss):
                    layer.disk = None  # (Unavailable: the copy is kept for later)
                fallen.append((layer, err))
                continue
            layer.disk = entry
            layer.checksum = entry.checksum
            layer.slab = slab
            progress.bytes_done += layer.plan.size
            progress.layers_done += 1
            self._on_landed(model, layer)
            self.report(model)
        if fallen:
            await self._fall_back_to_source(model, fallen)

    async def _fall_back_to_source(
        self, model: Model, fallen: Sequence[tuple[LayerState, TorporError]]
    ) -> None:
        """Layers whose disk copy failed are read from the source, which must
        not have changed since load (as for a level-2 wake)."""
        names = ", ".join(layer.plan.name for layer, _ in fallen)
        for layer, err in fallen:
            log.warning(
                "disk cache: reading a layer from the source instead",
                model_id=model.model_id,
                layer=layer.plan.name,
                reason=err.reason,
                error=err.message,
            )
        change = await self.blocking(check_unchanged, model.checkpoint)
        if change is not None:
            kept = [err for _, err in fallen if isinstance(err, Unavailable)]
            if kept:  # the disk copy may be readable again later: retry then
                raise kept[0]
            raise FailedPrecondition(
                f"the disk copy of model {model.model_id!r}'s layer(s) {names} was lost"
                f" ({fallen[0][1].message}), and its source changed since it was loaded:"
                f" {change}",
                reason="SOURCE_CHANGED",
                metadata={
                    "model_id": model.model_id,
                    "source": model.checkpoint.path,
                    "layers": names,
                },
            )
        assert model.progress is not None
        note = f"the disk copy of {names} failed ({fallen[0][1].reason}): read from the source"
        model.progress.note = "; ".join(filter(None, [model.progress.note, note]))
        self.report(model, force=True)

    def check_disk_room(self, model: Model, layers: Sequence[LayerState]) -> None:
        """DISK_FULL now, holding nothing, unless the cache has room for the
        copies to_disk would write (counting copies no model uses as room)."""
        assert self.disk is not None
        missing = [
            layer.plan.size
            for layer in layers
            if layer.disk is None and self.disk.get(cache_key(model.checkpoint, layer.plan)) is None
        ]
        if missing:
            self.disk.check_room(missing, self._disk_in_use())

    async def to_disk(self, model: Model, layers: Sequence[LayerState]) -> int:
        """Give each layer a disk copy: one the cache already holds for the same
        source and layer (another model's, or one a previous run left), else
        one written now (atomically, a few at a time so their fsyncs overlap).
        The layers keep their slabs; returns the bytes written. All or
        nothing: on failure (or cancellation) every copy this call wrote or
        took is given back, so the cache is as it was."""
        assert model.progress is not None and self.disk is not None
        disk, progress = self.disk, model.progress
        taken = [layer for layer in layers if layer.disk is None]
        for layer in taken:
            layer.disk = disk.get(cache_key(model.checkpoint, layer.plan))
        pending = [layer for layer in taken if layer.disk is None]
        try:
            room = disk.reserve([layer.plan.size for layer in pending], self._disk_in_use())
        except BaseException:
            for layer in taken:
                layer.disk = None
            raise
        gate = asyncio.Semaphore(DISK_WRITERS)

        async def one(layer: LayerState) -> None:
            async with gate:
                self._check_stopping()
                key = cache_key(model.checkpoint, layer.plan)
                with progress.phase(Stage.TRANSFER, layer.plan.size):
                    try:
                        entry = await self.blocking(self._write_disk, key, layer, room)
                    except FilesystemFull:  # (the budget allowed it; the filesystem not)
                        entry = await self._write_again(key, layer, room)
                layer.disk = entry
                progress.bytes_done += layer.plan.size
                progress.layers_done += 1
                self.report(model)

        try:
            # (gather waits for every write, cancelled or not, before raising)
            results = await asyncio.gather(
                *(one(layer) for layer in pending), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        except BaseException:
            for layer in taken:
                layer.disk = None
            disk.undo(room, self._disk_in_use())
            raise
        disk.release(room)
        return sum(layer.plan.size for layer in pending)

    async def _write_again(self, key: str, layer: LayerState, room: Reservation) -> DiskEntry:
        """After ENOSPC/EDQUOT: evict copies no model uses, then write once more."""
        assert self.disk is not None
        needed = DATA_OFFSET + layer.plan.size
        evicted = self.disk.make_room(needed, self._disk_in_use())
        try:
            return await self.blocking(self._write_disk, key, layer, room)
        except FilesystemFull as err:
            raise ResourceExhausted(
                f"{err.message}; {evicted} bytes of copies no model uses were evicted"
                " and the write tried again",
                reason="DISK_FULL",
                metadata={**err.metadata, "evicted": evicted},
            ) from None

    def _write_disk(self, key: str, layer: LayerState, room: Reservation) -> DiskEntry:
        # On the worker: the write and the bookkeeping of its share of `room`
        # happen together (in DiskCache.write), so a cancelled caller can't
        # count a share twice, and an entry written is always in `room`.
        assert self.disk is not None and layer.slab is not None
        with contextlib.closing(self._backend.read_out(layer.slab)) as pieces:
            return self.disk.write(key, pieces, layer.checksum, room, layer.plan.size)

    async def drop(self, model: Model, layers: Sequence[LayerState]) -> int:
        """Free the slabs of `layers`; they are then only in the source."""
        slabs = [layer.slab for layer in layers if layer.slab is not None]
        if model.progress is not None:
            self.set_stage(model, Stage.RELEASE)
        for layer in layers:
            layer.slab = None
        await self.blocking(self.free_all, slabs)
        freed = sum(slab.size for slab in slabs)
        if model.progress is not None:
            model.progress.bytes_freed += freed
        return freed

    def free_all(self, slabs: Sequence[Slab], confirm: bool = True) -> None:
        """Free every slab (blocking: run it on a worker thread)."""
        # On a worker thread: unmapping gigabytes of touched pages takes a
        # while, and the event loop must keep answering meanwhile. Every slab is
        # tried (one that fails stays live and accounted); the first error is
        # raised after.
        failed: BaseException | None = None
        for slab in slabs:
            try:
                self._backend.free(slab)
            except Exception as err:
                log.error(
                    "freeing a slab failed", slab=slab.id, owner=str(slab.owner), error=str(err)
                )
                failed = failed or err
        if confirm:
            self._backend.drain()
        if failed is not None:
            raise failed

    def forget(self, model: Model) -> None:
        self._last_publish.pop(id(model), None)
