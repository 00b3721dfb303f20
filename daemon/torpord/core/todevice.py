"""Wake and Offload to DEVICE: the plan that brings layers back to the
device, from HOST, a disk copy or the source (checked unchanged first)."""

from __future__ import annotations

from torpord.core.announce import Announcer
from torpord.core.model import LayerState, Model
from torpord.core.mover import Mover
from torpord.core.runner import Plan
from torpord.errors import DataLoss, FailedPrecondition, some
from torpord.storage.reader import check_unchanged
from torpord.types import ModelState, Tier, TransitionKind

__all__ = ["to_device"]


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
        with announcer.in_forward_order(model, moving):
            moved = await mover.move(model, moving, new, verify=verify)
        model.settle()
        return moved

    return Plan(kind, state, moving, body, new, target=Tier.DEVICE)
