"""How an image survives a daemon restart: through its disk copy alone.

An image (core/images.py) has no source file, so nothing of it outlives the
daemon but what is in the disk cache. Once every layer of an image has a
copy there (after a level-2 sleep, or offloads to DISK that leave no layer
without one), `keep` writes the image's manifest (storage/imageformat.py)
next to the copies, inside the transition that wrote the last copy (a
failure rolls both back). An Unload removes it first (`forget`): an image
unloaded does not come back.

At start `restore` reads every manifest as anyone could have written it:
bounded and checked field by field, its catalogue planned again as strictly
as a publisher's, its layout hash and disk cache keys recomputed, and each
copy it names found in the cache with the recorded size and checksum. Each
valid one is registered ASLEEP at level 2 (on its old device if this node
still has it), its layers served by their copies, which a live model's
layers keep from eviction; a wake reads them back and checks every
checksum, and engines attach as to any model. A manifest that is not valid
is logged (its file named, nothing of it quoted) and removed, and its image
is gone, as is every image that had no complete disk copy when the daemon
stopped. None of this ever stops the daemon from starting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno

import structlog

from torpord.backends.base import Backend
from torpord.core.events import EventBus, EventType
from torpord.core.model import LayerState, Model
from torpord.core.registry import Registry, check_model_id
from torpord.core.workers import Workers
from torpord.errors import InvalidArgument, ResourceExhausted, Unavailable
from torpord.storage.cachefiles import entry_is_lost
from torpord.storage.catalogue import plan_image
from torpord.storage.diskcache import DiskCache, cache_key
from torpord.storage.imagefiles import ImageFiles
from torpord.storage.imageformat import (
    BadManifest,
    ImageManifest,
    ManifestGroup,
    catalogue_of,
    decode,
    encode,
    manifest_name,
)
from torpord.storage.layers import LayerPlan, layout_hash
from torpord.storage.safetensors import Checkpoint
from torpord.types import ModelState

__all__ = ["RESTORED", "forget", "keep", "restore", "unkeep"]

log = structlog.get_logger("torpord.core")

RESTORED = "RESTORED"  # the state reason of an image restored at start


async def keep(model: Model, disk: DiskCache, workers: Workers) -> None:
    """Write the image's manifest once every layer has a disk copy (and
    none is written yet); nothing for a model loaded from a source."""
    if not model.fingerprint or model.restorable:
        return
    layers = []
    for layer in model.layers:
        if layer.disk is None:
            return
        layers.append((layer.plan, layer.checksum, layer.disk.key))
    args = (model.fingerprint, model.model_id, model.device, model.layout_hash, layers)
    await workers.blocking(_write, disk.images, *args)
    model.restorable = True


def _write(
    files: ImageFiles,
    fingerprint: str,
    model_id: str,
    device: str,
    layout: str,
    layers: list[tuple[LayerPlan, str, str]],
) -> None:
    """(On a worker: O(tensors).)"""
    groups = tuple(
        ManifestGroup(catalogue_of(plan), checksum, key) for plan, checksum, key in layers
    )
    data = encode(ImageManifest(fingerprint, model_id, device, layout, groups))
    try:
        files.write(manifest_name(fingerprint), data)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(
                f"disk cache: no room for image {model_id!r}'s manifest ({err.strerror})",
                reason="DISK_FULL",
                metadata={"model_id": model_id, "path": files.path("")},
            ) from None
        raise Unavailable(
            f"disk cache: writing image {model_id!r}'s manifest failed: {err.strerror}",
            reason="DISK_WRITE_FAILED",
            metadata={"model_id": model_id, "path": files.path("")},
        ) from None


def unkeep(model: Model, disk: DiskCache) -> None:
    """After a transition that may have written the manifest failed: remove
    it, if `keep` had not written it before (best effort: a manifest whose
    copies are gone is refused at the next start)."""
    if model.fingerprint and not model.restorable:
        try:
            disk.images.remove(manifest_name(model.fingerprint))
        except OSError as err:
            log.warning(
                "disk cache: an image manifest of a failed transition was not removed",
                model_id=model.model_id,
                error=err.strerror,
            )


async def forget(model: Model, disk: DiskCache, workers: Workers) -> None:
    """Remove the image's manifest (before its Unload changes anything):
    Unavailable if it can't be, and the Unload fails."""
    if not model.restorable:
        return
    files = disk.images
    try:
        await workers.blocking(files.remove, manifest_name(model.fingerprint))
    except OSError as err:
        raise Unavailable(
            f"disk cache: image {model.model_id!r}'s manifest could not be removed"
            f" ({err.strerror}); it would come back at the next start",
            reason="DISK_WRITE_FAILED",
            metadata={"model_id": model.model_id, "path": files.path("")},
        ) from None
    model.restorable = False


async def restore(
    registry: Registry,
    backend: Backend,
    bus: EventBus,
    disk: DiskCache,
    executor: concurrent.futures.Executor,
) -> list[str]:
    """Register every image the disk cache holds a valid manifest of, ASLEEP
    at level 2; the ids restored. Never raises for what a manifest holds."""
    loop = asyncio.get_running_loop()
    files = disk.images
    names, skipped = await loop.run_in_executor(executor, files.scan)
    for item in skipped:
        log.warning(
            "disk cache: skipped what is not an image manifest",
            path=item.path,
            why=item.why,
            removed=item.removed,
        )
    restored = []
    for name in names:
        try:
            # O(tensors): off the event loop.
            manifest, checkpoint, plans = await loop.run_in_executor(executor, _read, files, name)
            model = _model(manifest, checkpoint, plans, registry, backend, disk)
        except (BadManifest, OSError) as err:
            await loop.run_in_executor(executor, _refuse, files, name, err)
            continue
        except Exception as err:  # (a bug of ours: the start goes on, the file stays)
            log.error(
                "disk cache: reading an image manifest failed",
                path=files.path(name),
                error=type(err).__name__,
            )
            continue
        registry.adopt(model)
        registry.add(model)
        bus.publish(EventType.ADDED, model.snapshot())
        log.info(
            "restored an image from its disk copy: asleep at level 2",
            model_id=model.model_id,
            device=model.device,
            groups=len(model.layers),
            bytes=sum(plan.size for plan in plans),
        )
        restored.append(model.model_id)
    return restored


def _refuse(files: ImageFiles, name: str, err: BadManifest | OSError) -> None:
    """(On a worker.) Log a manifest refused, naming it and quoting nothing,
    and remove it (but one the system could not read right now)."""
    if isinstance(err, OSError):
        why = f"unreadable: {err.strerror}"
        lost = entry_is_lost(err)
    else:
        why, lost = str(err), True
    removed = False
    if lost:
        try:
            removed = files.remove(name)
        except OSError as failed:
            why += f" (and removing it failed: {failed.strerror})"
    log.error(
        "disk cache: refused an image manifest; its image was not restored",
        path=files.path(name),
        why=why,
        removed=removed,
    )


def _read(files: ImageFiles, name: str) -> tuple[ImageManifest, Checkpoint, tuple[LayerPlan, ...]]:
    """(On a worker.) The manifest in `name`, its catalogue planned and its
    layout hash and disk cache keys recomputed; BadManifest if any differs."""
    manifest = decode(name, files.read(name))
    try:
        checkpoint, plans = plan_image(manifest.fingerprint, [g.group for g in manifest.groups])
    except InvalidArgument as err:  # (its message quotes names: not logged)
        raise BadManifest(f"its catalogue is not valid ({err.reason})") from None
    if layout_hash(plans) != manifest.layout_hash:
        raise BadManifest("its layout hash is not its catalogue's")
    for i, (plan, group) in enumerate(zip(plans, manifest.groups, strict=True)):
        if cache_key(checkpoint, plan) != group.key:
            raise BadManifest(f"group {i}'s disk cache key is not the one of its catalogue")
    return manifest, checkpoint, plans


def _model(
    manifest: ImageManifest,
    checkpoint: Checkpoint,
    plans: tuple[LayerPlan, ...],
    registry: Registry,
    backend: Backend,
    disk: DiskCache,
) -> Model:
    """The image as a model ASLEEP at level 2, served by its disk copies;
    BadManifest if it can't be one."""
    try:
        check_model_id(manifest.model_id)
    except InvalidArgument:
        raise BadManifest("its model_id is not a valid model id") from None
    if manifest.model_id in registry.models:
        raise BadManifest("its model_id is another restored image's")
    if any(m.fingerprint == manifest.fingerprint for m in registry.models.values()):
        raise BadManifest("its fingerprint is another restored image's")
    layers = []
    for i, (plan, group) in enumerate(zip(plans, manifest.groups, strict=True)):
        entry = disk.get(group.key)
        if entry is None:
            raise BadManifest(f"the disk copy of group {i} is not in the cache")
        if entry.size != plan.size or entry.checksum != group.checksum:
            raise BadManifest(
                f"the disk copy of group {i} is not the one it records (size or checksum)"
            )
        layers.append(LayerState(plan, checksum=group.checksum, disk=entry))
    try:
        device = backend.resolve_device(manifest.device)
    except InvalidArgument:  # (that device is gone: the one with the most room)
        device = backend.pick_device()
    model = Model(manifest.model_id, checkpoint, device, layers)
    model.layout_hash = manifest.layout_hash
    model.sleep_level = 2
    model.set_state(
        ModelState.ASLEEP,
        RESTORED,
        "restored at the daemon's start from its disk copy; wake it to use it",
    )
    model.restorable = True
    return model
