"""The disk tier of a move: layers read from their disk copies (falling back
to the source), and disk copies written for level-2 sleep and Offload to DISK.

A disk copy is the source's bytes of one layer, kept in the disk cache under
a key that is the source's identity, so a copy another model (or a previous
run) left serves any load of the same source.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

import structlog

from torpord.backends.base import Backend, Slab
from torpord.core import imagedisk
from torpord.core.counters import Counters
from torpord.core.model import LayerState, Model
from torpord.core.observer import MoveObserver
from torpord.core.workers import Workers
from torpord.errors import (
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
from torpord.storage.reader import check_unchanged
from torpord.types import Stage, Tier

__all__ = ["DiskTier"]

log = structlog.get_logger("torpord.core")

# Layers written to the disk cache at once.
DISK_WRITERS = 4


class DiskTier:
    def __init__(
        self,
        backend: Backend,
        workers: Workers,
        observer: MoveObserver,
        disk: DiskCache | None,
        in_use: Callable[[], set[str]],
        counters: Counters,
    ) -> None:
        self._backend = backend
        self._workers = workers
        self.observer = observer
        self.disk = disk
        # The keys of the disk copies models use: never evicted, never removed.
        self._in_use = in_use
        self.counters = counters

    def has_copy(self, model: Model, layer: LayerState) -> bool:
        """Whether a layer not in memory comes from the disk cache: its own copy
        (even one the cache has lost since: `read` then falls back to the
        source), or one a previous load of the same source left there."""
        if layer.slab is not None or self.disk is None:
            return False
        if layer.disk is None:
            layer.disk = self.disk.get(cache_key(model.checkpoint, layer.plan))
        return layer.disk is not None

    async def read(self, model: Model, layers: Sequence[LayerState], slabs: Sequence[Slab]) -> None:
        """Fill the layers' slabs from their disk copies. A layer whose copy is
        lost (dropped from the cache) or can't be read right now is left
        unfilled for the source to fill, once the source is found unchanged."""
        assert model.progress is not None and self.disk is not None
        progress = model.progress
        fallen: list[tuple[LayerState, TorporError]] = []
        for layer, slab in zip(layers, slabs, strict=True):
            assert layer.disk is not None
            self._workers.check_stopping()
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
                    await self._workers.blocking(
                        self.disk.read_into, entry, self._backend.sink(slab), layer.plan.name
                    )
            except (DataLoss, Unavailable) as err:
                if err.reason == "CACHE_CORRUPT":  # (its bytes, or its size, were not the copy's)
                    self.counters.checksum_failed(Tier.DISK)
                if isinstance(err, DataLoss):
                    layer.disk = None  # (Unavailable: the copy is kept for later)
                fallen.append((layer, err))
                continue
            layer.disk = entry
            layer.checksum = entry.checksum
            layer.slab = slab
            progress.bytes_done += layer.plan.size
            progress.layers_done += 1
            progress.arrived(Tier.DISK, slab.tier, layer.plan.size)
            self.counters.moved_bytes(Tier.DISK, slab.tier, layer.plan.size)
            self.observer.landed(model, layer)
            self.observer.progress(model)
        if fallen:
            await self._fall_back_to_source(model, fallen)

    async def _fall_back_to_source(
        self, model: Model, fallen: Sequence[tuple[LayerState, TorporError]]
    ) -> None:
        """Layers whose disk copy failed are read from the source, which must
        not have changed since load (as for a level-2 wake)."""
        names = ", ".join(layer.plan.name for layer, _ in fallen)
        if model.fingerprint:  # an image: its disk copy was all there was
            raise DataLoss(
                f"the disk copy of image {model.model_id!r}'s layer(s) {names} failed"
                f" ({fallen[0][1].message}), and an image has no source: unload it and"
                " publish it again",
                reason="IMAGE_LOST",
                metadata={"model_id": model.model_id, "layers": names},
            )
        for layer, err in fallen:
            log.warning(
                "disk cache: reading a layer from the source instead",
                model_id=model.model_id,
                layer=layer.plan.name,
                reason=err.reason,
                error=err.message,
            )
        change = await self._workers.blocking(check_unchanged, model.checkpoint)
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
        self.observer.progress(model, force=True)

    async def forget_image(self, model: Model) -> None:
        """Before an image is unloaded: remove its manifest, so that it does
        not come back at the next start (Unavailable if it can't be)."""
        if self.disk is not None:
            await imagedisk.forget(model, self.disk, self._workers)

    def check_room(self, model: Model, layers: Sequence[LayerState]) -> None:
        """DISK_FULL now, holding nothing, unless the cache has room for the
        copies `write` would write (counting copies no model uses as room)."""
        assert self.disk is not None
        missing = [
            layer.plan.size
            for layer in layers
            if layer.disk is None and self._cached(model, layer) is None
        ]
        if missing:
            self.disk.check_room(missing, self._in_use())

    async def write(self, model: Model, layers: Sequence[LayerState]) -> int:
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
            layer.disk = self._cached(model, layer)
        pending = [layer for layer in taken if layer.disk is None]
        try:
            room = disk.reserve([layer.plan.size for layer in pending], self._in_use())
        except BaseException:
            for layer in taken:
                layer.disk = None
            raise
        gate = asyncio.Semaphore(DISK_WRITERS)
        # Writers that found the filesystem full try again one at a time, each
        # after evicting room for every layer of this call not yet written:
        # writers evicting for themselves alone, at once, raced each other
        # for the room freed and failed after all.
        again = asyncio.Lock()

        def unwritten() -> int:
            return sum(DATA_OFFSET + layer.plan.size for layer in pending if layer.disk is None)

        async def one(layer: LayerState) -> None:
            async with gate:
                self._workers.check_stopping()
                key = cache_key(model.checkpoint, layer.plan)
                with progress.phase(Stage.TRANSFER, layer.plan.size):
                    try:
                        entry = await self._workers.blocking(self._write, key, layer, room)
                    except FilesystemFull:  # (the budget allowed it; the filesystem not)
                        async with again:
                            entry = await self._write_again(key, layer, room, unwritten())
                layer.disk = entry
                progress.bytes_done += layer.plan.size
                progress.layers_done += 1
                assert layer.slab is not None
                self.counters.moved_bytes(layer.slab.tier, Tier.DISK, layer.plan.size)
                self.observer.progress(model)

        try:
            # (gather waits for every write, cancelled or not, before raising)
            results = await asyncio.gather(
                *(one(layer) for layer in pending), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            # An image whose every layer now has a copy survives a restart.
            await imagedisk.keep(model, disk, self._workers)
        except BaseException:
            for layer in taken:
                layer.disk = None
            disk.undo(room, self._in_use())
            imagedisk.unkeep(model, disk)  # (as undo: a few syscalls, on the loop)
            raise
        disk.release(room)
        return sum(layer.plan.size for layer in pending)

    def _cached(self, model: Model, layer: LayerState) -> DiskEntry | None:
        """The copy the cache holds for the layer's key, if it has the layer's
        bytes: an image published again under a fingerprint that did not
        change with its bytes must not take the last one's copies."""
        assert self.disk is not None
        entry = self.disk.get(cache_key(model.checkpoint, layer.plan))
        if entry is None or (layer.checksum and entry.checksum != layer.checksum):
            return None
        return entry

    async def _write_again(
        self, key: str, layer: LayerState, room: Reservation, needed: int
    ) -> DiskEntry:
        """After ENOSPC/EDQUOT: evict copies no model uses (`needed` bytes'
        worth), then write once more."""
        assert self.disk is not None
        evicted = self.disk.make_room(needed, self._in_use())
        try:
            return await self._workers.blocking(self._write, key, layer, room)
        except FilesystemFull as err:
            raise ResourceExhausted(
                f"{err.message}; {evicted} bytes of copies no model uses were evicted"
                " and the write tried again",
                reason="DISK_FULL",
                metadata={**err.metadata, "evicted": evicted},
            ) from None

    def _write(self, key: str, layer: LayerState, room: Reservation) -> DiskEntry:
        # On the worker: the write and the bookkeeping of its share of `room`
        # happen together (in DiskCache.write), so a cancelled caller can't
        # count a share twice, and an entry written is always in `room`.
        assert self.disk is not None and layer.slab is not None
        with contextlib.closing(self._backend.read_out(layer.slab)) as pieces:
            return self.disk.write(key, pieces, layer.checksum, room, layer.plan.size)
