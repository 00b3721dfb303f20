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

On a GPU, kernels run after the call returns: a quiesce first synchronises
the device, so no launched kernel still reads the weights when they go.
(With full CUDA graphs the runner replays without calling `forward`; vLLM
on CPU, and eager or piecewise GPU runs, call it.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torpor.agent.attach import AttachedModel
from torpor.client import Client

__all__ = ["GUARDED", "guard"]

GUARDED = ("forward", "compute_logits", "embed_input_ids")


def _guarded(call: Callable[..., Any], attached: AttachedModel) -> Callable[..., Any]:
    @functools.wraps(call)
    def run(*args: Any, **kwargs: Any) -> Any:
        with attached.use():
            return call(*args, **kwargs)

    return run


def guard(model: nn.Module, attached: AttachedModel, client: Client) -> None:
    """Run the model's weight-reading calls inside `attached.use()`, and keep
    the attachment (and its client) alive as long as the model."""
    for name in GUARDED:
        call = getattr(model, name, None)
        if callable(call):
            # An instance attribute: nn.Module.__call__ looks up self.forward.
            object.__setattr__(model, name, _guarded(call, attached))
    if attached.slab_kind == "cuda":

        @attached.on_quiesce
        def synchronize(layers: list[str]) -> None:
            torch.cuda.synchronize(attached.device_index)

    object.__setattr__(model, "torpor_image", attached)
    object.__setattr__(model, "torpor_client", client)
