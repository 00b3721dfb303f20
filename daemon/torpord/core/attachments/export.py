"""Exporting a model's device slabs to the process that attached, and no
other: the fd socket's answer, before it travels."""

from __future__ import annotations

import os
from typing import Any

from torpord.core.attachments.attachment import Attachment
from torpord.core.attachments.host import EngineHost
from torpord.errors import FailedPrecondition, InvalidArgument, PermissionDenied, some
from torpord.types import ModelState, Tier

__all__ = ["export_slabs"]


def export_slabs(
    host: EngineHost, attachment: Attachment, peer_pid: int, names: list[str], model_id: str
) -> tuple[dict[str, Any], list[int]]:
    """The header and fresh fds of the asked layers that are on the device
    (every such layer if none is named), for the attachment's own process.
    Asked layers not on the device are listed as absent; the exported slabs
    are counted as mapped by the engine."""
    if attachment.pid != peer_pid:
        raise PermissionDenied(
            f"attachment belongs to pid {attachment.pid}, asked by pid {peer_pid}",
            reason="PID_MISMATCH",
            metadata={"attached_pid": attachment.pid, "peer_pid": peer_pid},
        )
    if model_id and model_id != attachment.model_id:
        raise PermissionDenied(
            f"the attachment is to model {attachment.model_id!r}, not {model_id!r}",
            reason="MODEL_MISMATCH",
            metadata={"attached_model": attachment.model_id, "model_id": model_id},
        )
    if attachment.released:
        raise FailedPrecondition(
            "this attachment was released by its engine", reason="ATTACHMENT_RELEASED"
        )
    model = host.find(attachment.model_id)
    if model is None:
        raise FailedPrecondition(f"model {attachment.model_id!r} is gone", reason="MODEL_NOT_FOUND")
    writable = model.state is ModelState.PUBLISHING
    # (Once its engine said Commit, not even the publisher takes them writable.)
    publishing = attachment.writer and model.publisher == attachment.id
    if writable and (model.busy or attachment.committing is not None or not publishing):
        raise FailedPrecondition(
            f"model {model.model_id!r} is being published; only its publisher takes its"
            " slabs, until it commits",
            reason="MODEL_NOT_ACTIVE",
            metadata={"model_id": model.model_id, "state": model.state.value},
        )
    asked = [layer for layer in model.layers if not names or layer.plan.name in names]
    unknown = set(names) - {layer.plan.name for layer in asked}
    if unknown:
        raise InvalidArgument(f"unknown layers {some(sorted(unknown))}", reason="UNKNOWN_LAYER")
    layers = [layer for layer in asked if layer.tier is Tier.DEVICE]
    fds: list[int] = []
    try:
        for layer in layers:
            assert layer.slab is not None
            fds.append(host.backend.export(layer.slab, writable=writable))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for layer in layers:
        assert layer.slab is not None
        attachment.mapped[layer.plan.name] = layer.slab
    header = {
        "model_id": model.model_id,
        "layout_hash": attachment.layout_hash,
        "layers": [{"name": layer.plan.name, "size": layer.plan.size} for layer in layers],
        "absent": [layer.plan.name for layer in asked if layer.tier is not Tier.DEVICE],
        "writable": writable,
    }
    return header, fds
