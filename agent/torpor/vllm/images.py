"""Finding, waiting for, waking and publishing a vLLM engine's image in torpord.

An image is found by its fingerprint. ACTIVE: attach. Asleep or offloaded:
wake it, then attach. Being published by another engine (two ranks or two
servers starting together): wait for its commit, up to `wait_s`, then
attach; if that publisher dies, the image is gone and this engine publishes
it instead. Not there: the caller loads and publishes; if another engine
published the same fingerprint meanwhile (ALREADY_EXISTS IMAGE_EXISTS),
this one attaches to that image instead. FAILED: a clear error (unload it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torpor.agent.attach import AttachedModel
from torpor.agent.publish import publish
from torpor.client import Client
from torpor.errors import TorporError
from torpor.v1 import common_pb2, models_pb2

if TYPE_CHECKING:
    import torch

__all__ = ["ImageFailed", "attach_image", "image_bytes", "publish_or_join"]

# Under vLLM's logger, so its handler shows these lines with its own.
log = logging.getLogger("vllm.torpor")

_POLL_S = 0.1
_WAKEABLE = (common_pb2.MODEL_STATE_ASLEEP, common_pb2.MODEL_STATE_OFFLOADED)
_PASSING = (
    common_pb2.MODEL_STATE_PUBLISHING,
    common_pb2.MODEL_STATE_SLEEPING,
    common_pb2.MODEL_STATE_WAKING,
    common_pb2.MODEL_STATE_OFFLOADING,
    common_pb2.MODEL_STATE_LOADING,
)
# Attach refusals that a moment later may not hold (the model went to sleep,
# or away, between the look-up and the attach).
_RETRY = {"MODEL_NOT_ACTIVE", "MODEL_NOT_FOUND", "TRANSITION_IN_PROGRESS"}


class ImageFailed(RuntimeError):
    """The daemon's image for this fingerprint can't be used."""


def _state_name(state: int) -> str:
    return common_pb2.ModelState.Name(state)  # type: ignore[arg-type]


def image_bytes(client: Client, fingerprint: str) -> int:
    """The bytes of the image with this fingerprint (0 if there is none)."""
    found = client.list_models(view=models_pb2.MODEL_VIEW_BASIC, fingerprint=fingerprint)
    return sum(layer.size_bytes for layer in found[0].layers) if found else 0


def attach_image(
    client: Client, fingerprint: str, *, wait_s: float, rank: int
) -> AttachedModel | None:
    """Attach to the ACTIVE image with this fingerprint, waking it or waiting
    for its publisher first; None when there is none (any more)."""
    deadline = time.monotonic() + wait_s
    said = ""
    while True:
        found = client.list_models(view=models_pb2.MODEL_VIEW_BASIC, fingerprint=fingerprint)
        if not found:
            return None
        model = found[0]
        if model.state == common_pb2.MODEL_STATE_ACTIVE:
            try:
                return AttachedModel(model.model_id, client=client, engine="vllm", rank=rank)
            except TorporError as err:
                if err.reason not in _RETRY:
                    raise
                log.info(
                    "torpor: image %s changed under the attach (%s); again", model.model_id, err
                )
        elif model.state in _WAKEABLE:
            log.info("torpor: waking image %s (%s)", model.model_id, _state_name(model.state))
            try:
                client.wake_model(model.model_id)
            except TorporError as err:
                if err.code.name not in ("ABORTED", "FAILED_PRECONDITION", "NOT_FOUND"):
                    raise
                log.info("torpor: wake of %s refused (%s); looking again", model.model_id, err)
        elif model.state in _PASSING:
            if said != _state_name(model.state):
                said = _state_name(model.state)
                log.info(
                    "torpor: waiting for image %s (%s)", model.model_id, _state_name(model.state)
                )
        else:
            raise ImageFailed(
                f"load_format='torpor': the daemon's image {model.model_id!r} for this"
                f" engine is {_state_name(model.state)}"
                f"{': ' + model.state_reason if model.state_reason else ''};"
                f" unload it (torporctl unload {model.model_id}) and start again"
            )
        if time.monotonic() > deadline:
            raise ImageFailed(
                f"load_format='torpor': the image {model.model_id!r} stayed"
                f" {_state_name(model.state)} for {wait_s:g}s (model_loader_extra_config"
                " 'wait_s'); is another engine still publishing it?"
            )
        time.sleep(_POLL_S)


def publish_or_join(
    client: Client,
    model_id: str,
    fingerprint: str,
    groups: Sequence[tuple[str, Mapping[str, torch.Tensor]]],
    *,
    wait_s: float,
    rank: int,
) -> AttachedModel:
    """Publish `groups` as the image; if another engine published this
    fingerprint first, attach to its image instead."""
    while True:
        try:
            return publish(model_id, fingerprint, groups, client=client, engine="vllm", rank=rank)
        except TorporError as err:
            if err.reason == "MODEL_EXISTS":
                raise ImageFailed(
                    f"load_format='torpor': the daemon already has a model {model_id!r} that"
                    " is not this engine's image; choose another model_loader_extra_config"
                    " 'model_id' (or unload that model)"
                ) from None
            if err.reason != "IMAGE_EXISTS":
                raise
        log.info("torpor: another engine published this image first; attaching to it")
        attached = attach_image(client, fingerprint, wait_s=wait_s, rank=rank)
        if attached is not None:
            return attached
