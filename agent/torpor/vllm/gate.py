"""Keep a vLLM model's image mapped while vLLM computes with it.

The daemon may put the image to sleep, offload it or wake it at any time
(`torporctl sleep`, a scheduler's SleepModel, its own policies). Before it
takes the weights away the agent waits for every `use()` block to end, and
a block that starts while they are away waits until they are back. vLLM's
model runner touches the weights in three calls, each of which becomes such
a block: `forward` (every layer), `compute_logits` (the lm_head, called
after forward returns) and `embed_input_ids` (prompt embeddings). So a step
in flight finishes before a sleep; a step that arrives while asleep waits
for the wake and is answered then; none reads an unmapped page.

When the attachment ends (torpord restarted or stopped, the image
unloaded), the next call waits up to `wait_s` for the image to be back and
attaches again at the same addresses (`AttachedModel.reattach`): a daemon
that restarts restores an image that had a complete disk copy (asleep at
level 2, RESTORED), which is woken here. An image that did not come back
is a clear error, and the engine must be started again (which publishes
it anew).

On a GPU, kernels run after the call returns: a quiesce first synchronises
the device, so no launched kernel still reads the weights when they go.
(With full CUDA graphs the runner replays without calling `forward`; vLLM
on CPU, and eager or piecewise GPU runs, call it.)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import grpc
import torch
from torch import nn

from torpor.agent.attach import AttachedModel
from torpor.client import Client
from torpor.errors import TorporError
from torpor.v1 import common_pb2, models_pb2

__all__ = ["GUARDED", "Image", "guard", "serving"]

GUARDED = ("forward", "compute_logits", "embed_input_ids")

# Under vLLM's logger, so its handler shows these lines with its own.
log = logging.getLogger("vllm.torpor")

_POLL_S = 0.2


class Image:
    """A model's attachment to its image, and how to get it back."""

    def __init__(
        self, attached: AttachedModel, client: Client, fingerprint: str, wait_s: float
    ) -> None:
        self.attached = attached
        self.client = client
        self.fingerprint = fingerprint
        self.wait_s = wait_s
        self._lock = threading.Lock()

    def call(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`call` with the weights held; reattached first if the attachment ended."""
        while True:
            with contextlib.ExitStack() as held:
                try:
                    held.enter_context(self.attached.use())
                except TorporError:
                    if self.attached.ended is None:
                        raise
                    self.recover()
                    continue
                return call(*args, **kwargs)

    def let_go(self) -> None:
        """Detach, keeping the addresses, until `recover` (see
        AttachedModel.let_go): a vLLM sleep while other engines use the image."""
        with self._lock:
            self.attached.let_go()

    def recover(self) -> None:
        """Attach again once the daemon has the image back (woken if asleep)."""
        with self._lock:
            ended = self.attached.ended
            if ended is None:
                return  # (another thread did)
            if ended.reason == "LET_GO":
                log.info("torpor: attaching to image %s again", self.attached.model_id)
            else:
                log.warning("torpor: lost the image (%s); waiting for it", ended)
            deadline = time.monotonic() + self.wait_s
            said = ""
            while True:
                try:
                    if self._back():
                        self.attached.reattach()
                        log.info("torpor: attached to image %s again", self.attached.model_id)
                        return
                except TorporError as err:
                    if err.reason in ("LAYOUT_CHANGED", "DEVICE_CHANGED", "DETACHED"):
                        raise
                    if str(err) != said:  # (once per reason, not once per look)
                        said = str(err)
                        log.info("torpor: image not back yet: %s", err)
                if time.monotonic() > deadline:
                    raise TorporError(
                        grpc.StatusCode.UNAVAILABLE,
                        "IMAGE_GONE",
                        f"load_format='torpor': the image {self.attached.model_id!r} did not"
                        f" come back within {self.wait_s:g}s (a daemon restart keeps only"
                        " images with a disk copy); start the engine again",
                    )
                time.sleep(_POLL_S)

    def _back(self) -> bool:
        """Whether the image is ACTIVE (waking it if it is asleep)."""
        found = self.client.list_models(
            view=models_pb2.MODEL_VIEW_BASIC, fingerprint=self.fingerprint
        )
        if not found or found[0].model_id != self.attached.model_id:
            return False
        state = found[0].state
        if state in (common_pb2.MODEL_STATE_ASLEEP, common_pb2.MODEL_STATE_OFFLOADED):
            self.client.wake_model(found[0].model_id)
            return True
        return bool(state == common_pb2.MODEL_STATE_ACTIVE)


def _guarded(call: Callable[..., Any], image: Image) -> Callable[..., Any]:
    @functools.wraps(call)
    def run(*args: Any, **kwargs: Any) -> Any:
        return image.call(call, *args, **kwargs)

    return run


# The images of the models this process serves (those still alive): what
# vLLM's sleep backend, which vLLM makes with no arguments, acts on.
_serving: weakref.WeakSet[Image] = weakref.WeakSet()


def serving() -> list[Image]:
    """The images of the models this process serves, in no particular order."""
    return list(_serving)


def guard(model: nn.Module, image: Image) -> None:
    """Run the model's weight-reading calls with the image's weights held,
    and keep the attachment (and its client) alive as long as the model."""
    _serving.add(image)
    attached = image.attached
    for name in GUARDED:
        call = getattr(model, name, None)
        if callable(call):
            # An instance attribute: nn.Module.__call__ looks up self.forward.
            object.__setattr__(model, name, _guarded(call, image))
    if attached.slab_kind == "cuda":

        @attached.on_quiesce
        def synchronize(layers: list[str]) -> None:
            torch.cuda.synchronize(attached.device_index)

    object.__setattr__(model, "torpor_image", attached)
    object.__setattr__(model, "torpor", image)
