"""Wake and Offload to DEVICE: the plan that brings layers back to the
device, from HOST, a disk copy or the source (checked unchanged first);
and Sleep at level 1 of a level-2 sleeper, which brings its weights back
to HOST the same way (`to_host`)."""

from __future__ import annotations

from torpord.core.announce import Announcer
from torpord.core.model import LayerState, Model
from torpord.core.mover import Mover
from torpord.core.runner import Plan
from torpord.errors import DataLoss, FailedPrecondition, some
from torpord.storage.reader import check_unchanged
from torpord.types import ModelState, Tier, TransitionKind

__all__ = ["to_device", "to_host"]


def to_device(
    mover: Mover,
    announcer: Announcer,
    model: Model,
    moving: list[LayerState],
    kind: TransitionKind,
    state: ModelState,
    verify: bool,
) -> Plan:
    """Wake and Offload to DEVICE: bring `moving` back, from HOST or the source."""
    new = mover.allocate(model, moving, Tier.DEVICE)

    async def body() -> int:
        await _check_source(mover, model, moving)
        with announcer.in_forward_order(model, moving):
            moved = await mover.move(model, moving, new, verify=verify)
        model.settle()
        return moved

    return Plan(kind, state, moving, body, new, target=Tier.DEVICE)


def to_host(mover: Mover, model: Model) -> Plan:
    """Sleep at level 1 of a level-2 sleeper: its weights, read back from
    the disk copy or the source into host memory, so that the next Wake
    is a fast one (a policy warms it for a window, or stages it there
    before it is woken: see policies/stage.py). Its engines stay quiesced."""
    moving = [layer for layer in model.layers if layer.slab is None]
    new = mover.allocate(model, moving, Tier.HOST)

    async def body() -> int:
        await _check_source(mover, model, moving)
        moved = await mover.move(model, moving, new)
        model.sleep_level = 1
        model.set_state(ModelState.ASLEEP)
        return moved

    return Plan(TransitionKind.SLEEP, ModelState.SLEEPING, moving, body, new, sleep_level=1)


async def _check_source(mover: Mover, model: Model, moving: list[LayerState]) -> None:
    """Refuse to read back layers an image lost, or a source that changed."""
    lost = [layer.plan.name for layer in moving if layer.tier is Tier.SOURCE]
    if lost and model.fingerprint:
        raise DataLoss(
            f"model {model.model_id!r} is an image and its layer(s) {some(lost)} are"
            " in no memory and no disk copy: unload it and publish it again",
            reason="IMAGE_LOST",
            metadata={"model_id": model.model_id, "layers": some(lost)},
        )
    if lost:
        change = await mover.blocking(check_unchanged, model.checkpoint)
        if change is not None:
            raise FailedPrecondition(
                f"the source of model {model.model_id!r} changed since it was loaded: {change}",
                reason="SOURCE_CHANGED",
                metadata={"model_id": model.model_id, "source": model.checkpoint.path},
            )
