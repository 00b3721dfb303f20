"""What a copy the scrubber found corrupt does to its model.

As with a corrupt disk entry on the read path, a corrupt copy is refused,
never served: it is let go of, and the layer is served from the next copy
down (its disk copy, else the source), which a wake reads and checks against
the layer's checksum as it always does. The model keeps its place in the
lifecycle, with a state reason that says what happened and what a wake does:

- a level-1 sleeper's host copy: the whole host copy is freed (memory that
  rotted in one slab is not trusted for the others, and a level-1 sleeper
  half in host memory would be neither level) and the model is ASLEEP at
  level 2, reason HOST_COPY_CORRUPT;
- a layer offloaded to host memory: that layer's slab is freed and the model
  stays OFFLOADED with that layer in its disk copy or source, reason
  HOST_COPY_CORRUPT; its other layers are where the caller put them;
- a disk copy: it is removed from the cache (as the read path removes one)
  and every idle model using it serves that layer from the source, reason
  DISK_COPY_CORRUPT.

A host copy a transition found corrupt (a verified copy from it) is refused
the same way once that transition has rolled back (`refuse_suspect`), so no
later call serves it, verified or not.

Everything here runs on the event loop, on a model that is not in a
transition (or whose transition has just rolled back); freeing the slabs is
the caller's.
"""

from __future__ import annotations

from torpord.backends.base import Slab
from torpord.core.model import LayerState, Model
from torpord.errors import some
from torpord.storage.diskcache import DiskEntry
from torpord.types import ModelState, Tier

__all__ = [
    "DISK_COPY_CORRUPT",
    "HOST_COPY_CORRUPT",
    "disk_copy_corrupt",
    "host_copy_corrupt",
    "refuse_suspect",
    "suspected",
]

HOST_COPY_CORRUPT = "HOST_COPY_CORRUPT"
DISK_COPY_CORRUPT = "DISK_COPY_CORRUPT"


def _lost(model: Model) -> list[str]:
    """Layers of an image that now have no copy at all: an image has no source."""
    if not model.fingerprint:
        return []
    return [layer.plan.name for layer in model.layers if layer.tier is Tier.SOURCE]


def _then(model: Model, verb: str, what: str = "the layer") -> str:
    lost = _lost(model)
    if lost:
        return (
            f"; the model is an image, which has no source, and its layer(s) {some(lost)} now"
            " have no copy left: unload it and publish it again"
        )
    return f"; {verb} reads {what} again from the disk cache or the source, checked"


def host_copy_corrupt(model: Model, layer: LayerState) -> list[Slab]:
    """`layer`'s host slab did not match its checksum: detach what must be
    freed, set the model's state; returns the slabs to free."""
    name = layer.plan.name
    if model.state is ModelState.ASLEEP:
        slabs = [lay.slab for lay in model.layers if lay.slab is not None]
        for lay in model.layers:
            lay.slab = None
        model.sleep_level = 2
        message = (
            f"the host copy of layer {name} did not match its checksum: the model's host copy"
            " was freed and it sleeps at level 2" + _then(model, "a wake", "its weights")
        )
        model.set_state(ModelState.ASLEEP, HOST_COPY_CORRUPT, message)
        return slabs
    assert layer.slab is not None
    slabs = [layer.slab]
    layer.slab = None
    model.settle()
    where = "disk copy" if layer.disk is not None else "source"
    message = (
        f"the host copy of layer {name} did not match its checksum: it was freed and the"
        f" layer is in its {where} now" + _then(model, "a wake or an offload to DEVICE")
    )
    model.set_state(model.state, HOST_COPY_CORRUPT, message)
    return slabs


def suspected(suspect: dict[int, str], slab_id: int, found: str) -> bool:
    """Put the host copy `slab_id`, found corrupt (`found`: how), in
    `suspect` unless it is there already; whether it is new there. Whoever
    puts a copy there counts it, so one corrupt copy counts once."""
    if slab_id in suspect:
        return False
    suspect[slab_id] = found
    return True


def refuse_suspect(model: Model, suspect: dict[int, str]) -> list[Slab]:
    """`model`'s host slabs in `suspect` (id -> what was found: by a verified
    copy from one, or by the scrubber while a transition held the model),
    its transition having just rolled back: each is refused as the scrubber
    refuses one, and forgotten. Returns the slabs to free."""
    if model.state not in (ModelState.ASLEEP, ModelState.OFFLOADED):
        return []  # (FAILED: it holds what it holds until it is unloaded)
    slabs: list[Slab] = []
    for layer in model.layers:
        slab = layer.slab
        if slab is not None and slab.tier is Tier.HOST and slab.id in suspect:
            slabs += host_copy_corrupt(model, layer)
    for slab in slabs:
        suspect.pop(slab.id, None)
    return slabs


def disk_copy_corrupt(models: list[Model], entry: DiskEntry, why: str) -> list[Model]:
    """`entry` (already removed from the cache) is corrupt (`why`): every
    idle model whose layers use it lets go of it. Returns the models changed."""
    changed = []
    for model in models:
        if model.busy:  # (its transition's read refuses the copy itself)
            continue
        layers = [lay for lay in model.layers if lay.disk is not None and lay.disk.key == entry.key]
        if not layers:
            continue
        for layer in layers:
            layer.disk = None
        names = ", ".join(layer.plan.name for layer in layers)
        if _lost(model):
            then = _then(model, "")
        elif any(layer.slab is None for layer in layers):
            then = "; a wake reads the layer from the source, checked"
        else:
            then = "; the layer's copy in memory is another, unaffected"
        message = f"the disk copy of layer {names} is corrupt ({why}): it was removed"
        model.set_state(model.state, DISK_COPY_CORRUPT, message + " from the cache" + then)
        changed.append(model)
    return changed
