"""Moving a model's layers between tiers: all-or-nothing, in forward order.

Every move allocates all its destination slabs first (so running out of memory
is found before anything changes), fills them (from the disk tier or the
source through the parallel read pipeline, from other slabs one layer at a
time in forward order; each layer points at its new slab as soon as it is
filled, the basis of progressive wake), and only then frees the old slabs. If
anything fails part-way the layers point back at their old slabs and every
new slab is freed, so the model is exactly as it was. What happens is
reported to one observer (`core/observer.py`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import structlog

from torpord.backends.base import Backend, Slab, SlabOwner
from torpord.core.corrupt import suspected
from torpord.core.counters import Counters
from torpord.core.disktier import DiskTier
from torpord.core.model import LayerState, Model, Progress
from torpord.core.observer import MoveObserver, NoObserver
from torpord.core.workers import Workers, settle
from torpord.errors import Aborted, DataLoss, FailedPrecondition
from torpord.storage.diskcache import DiskCache
from torpord.storage.pipeline import ReadOptions, StopRequested, read_layers
from torpord.types import Stage, Tier

__all__ = ["Mover"]

log = structlog.get_logger("torpord.core")

T = TypeVar("T")


class Mover:
    def __init__(
        self,
        backend: Backend,
        executor: concurrent.futures.Executor,
        observer: MoveObserver | None = None,
        read_options: ReadOptions | None = None,
        disk: DiskCache | None = None,
        *,
        disk_in_use: Callable[[], set[str]] = set,
        counters: Counters | None = None,
    ) -> None:
        self._backend = backend
        self.observer: MoveObserver = observer or NoObserver()
        self.read_options = read_options or ReadOptions()
        self.workers = Workers(executor)
        self.counters = counters or Counters()
        # Host slabs found corrupt (id -> what was found) but not refused yet:
        # by the scrubber as a transition took their model, or by a verified
        # copy from them. A copy from one is verified, whatever the caller
        # asked, so it is never served; the runner refuses them once the
        # transition has rolled back (core/corrupt.py), the scrubber at its
        # next walk once their model is at rest. Each was counted in the
        # checksum failures by whoever found it first, and only then.
        self.suspect: dict[int, str] = {}
        self.disk_tier = DiskTier(
            backend, self.workers, self.observer, disk, disk_in_use, self.counters
        )

    @property
    def disk(self) -> DiskCache | None:
        return self.disk_tier.disk

    @disk.setter
    def disk(self, disk: DiskCache | None) -> None:
        self.disk_tier.disk = disk

    @property
    def stopping(self) -> threading.Event:
        """Set on shutdown once the grace period is over: a worker in the middle
        of a big layer stops at its next piece instead of finishing the layer."""
        return self.workers.stopping

    async def blocking(
        self, fn: Callable[..., T], *args: object, on_cancel: Callable[[], object] | None = None
    ) -> T:
        """Run fn on a worker thread (see Workers.blocking)."""
        return await self.workers.blocking(fn, *args, on_cancel=on_cancel)

    def set_stage(self, model: Model, stage: Stage) -> None:
        assert model.progress is not None
        model.progress.stage = stage
        self.observer.progress(model, force=True)

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
                self.counters.checksum_failed(Tier.SOURCE)
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
            progress.arrived(Tier.SOURCE, layer.slab.tier, layer.plan.size)
            self.counters.moved_bytes(Tier.SOURCE, layer.slab.tier, layer.plan.size)
            self.observer.landed(model, layer)
            self.observer.progress(model)

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
            self.observer.progress(model, force=True)

    async def copy(self, model: Model, layer: LayerState, slab: Slab, *, verify: bool) -> None:
        """Copy layer's current slab into slab; with `verify`, check the bytes
        that arrived against the layer's checksum."""
        assert model.progress is not None and layer.slab is not None
        progress = model.progress
        size = layer.plan.size

        def on_bytes(n: int) -> None:  # called on the worker thread
            progress.bytes_done += n
            self.workers.check_stopping()

        with progress.phase(Stage.TRANSFER, size):
            await self.blocking(self._backend.copy, layer.slab, slab, on_bytes)
        # (Asked after the copy: a scrub's verdict on the piece it was reading
        # when this transition began is in by then.)
        if not verify and layer.slab.id not in self.suspect:
            return
        with progress.phase(Stage.VERIFY, size):
            digest = await self.blocking(self._backend.checksum, slab)
        if digest != layer.checksum:
            found = f"checksum {digest}, expected {layer.checksum}"
            host = layer.slab.tier is Tier.HOST  # (kept: refused once this has rolled back)
            if not host or suspected(self.suspect, layer.slab.id, found):
                self.counters.checksum_failed(layer.tier)
            refused = (
                " and is refused (the model's state says what a wake does now)" if host else ""
            )
            raise DataLoss(
                f"layer {layer.plan.name} of model {model.model_id!r} arrived with"
                f" {found}: its {layer.tier.value}"
                f" copy is corrupt{refused}; nothing corrupt was made active",
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
        self.observer.progress(model, force=True)
        try:
            from_disk = [
                i for i, layer in enumerate(layers) if self.disk_tier.has_copy(model, layer)
            ]
            if from_disk:
                await self.disk_tier.read(
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
                came_from = layer.tier
                layer.slab = slab
                progress.arrived(came_from, slab.tier, layer.plan.size)
                self.counters.moved_bytes(came_from, slab.tier, layer.plan.size)
                done += layer.plan.size
                progress.bytes_done = done  # exact, whatever the pieces added up to
                progress.layers_done += 1
                self.observer.landed(model, layer)
                self.observer.progress(model)
            progress.bytes_done = progress.bytes_total
        except BaseException:
            landed = [
                layer
                for layer, slab in zip(layers, new, strict=True)
                if layer.slab is slab and slab.tier is Tier.DEVICE
            ]
            try:
                if landed:
                    # Engines let go of the new slabs before they are freed,
                    # however often this task is cancelled meanwhile.
                    await settle(self.observer.retract(model, landed))
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

    # -- the disk tier (core/disktier.py) ---------------------------------------

    def check_disk_room(self, model: Model, layers: Sequence[LayerState]) -> None:
        """DISK_FULL now, holding nothing, unless the cache has room for the
        copies to_disk would write."""
        self.disk_tier.check_room(model, layers)

    async def to_disk(self, model: Model, layers: Sequence[LayerState]) -> int:
        """Give each layer a disk copy (all or nothing); returns the bytes written."""
        return await self.disk_tier.write(model, layers)

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
