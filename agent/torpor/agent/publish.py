"""Publish an engine's final weights into the daemon, as an image.

An engine whose parameters are not the checkpoint's tensors (fused, sharded,
quantized, renamed: vLLM, transformers' MoE conversions) computes them once
and publishes them; every later start with the same fingerprint maps them,
with no read and no processing:

    from torpor.agent import publish

    found = publish.find_image(fingerprint)
    if found:
        model = attach(found)                       # no read, no processing
    else:
        weights = build_the_usual_way()             # {name: tensor}
        model = publish.publish("llama-tp0", fingerprint, publish.groups_of(weights))
    module.load_state_dict(model.state_dict(), assign=True)

The daemon allocates a slab per group (all or nothing, against its
budgets), the agent maps them writable at addresses it keeps for good, the
tensors are copied in, and the commit has the daemon seal (nothing can
change them any more) and checksum them; the same addresses are then
mapped read-only. The image sleeps, wakes, offloads and verifies like a
loaded model; having no source, its level-2 sleep and DISK offload keep a
copy in the daemon's disk cache. If this process dies before the commit,
the daemon removes the model and frees its memory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torpor.agent.attach import AttachedModel
from torpor.agent.mapping import torch_dtype
from torpor.client import Client
from torpor.v1 import agent_pb2, models_pb2

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALIGNMENT",
    "find_image",
    "groups_of",
    "publish",
    "publish_request",
    "safetensors_dtype",
]

ALIGNMENT = 256  # where each tensor starts in its slab (the daemon's minimum)

# Every safetensors dtype name (the daemon's list); those torch has map both ways.
_NAMES = (
    "BOOL",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "F64",
    "I64",
    "U64",
    "C64",
)
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; ValueError if it has none."""
    for name in _NAMES:
        try:
            if torch_dtype(name) == dtype:
                return name
        except ValueError:
            continue
    raise ValueError(f"torch dtype {dtype} has no safetensors name")


def groups_of(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Tensors grouped as the daemon groups a checkpoint: `pre`, then
    `layers.N` for each block N named in the tensor names (`...layers.N.`,
    `h.N.`, `blocks.N.`), then `post` for what comes after the last block;
    what comes before the first block is `pre`. Order within a group is kept."""
    pre: dict[str, torch.Tensor] = {}
    post: dict[str, torch.Tensor] = {}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    seen_block = False
    for name, tensor in tensors.items():
        found = _BLOCK.search(name)
        if found:
            blocks.setdefault(int(found.group(1)), {})[name] = tensor
            seen_block = True
        elif seen_block:
            post[name] = tensor
        else:
            pre[name] = tensor
    out = [("pre", pre)] if pre else []
    out += [(f"layers.{n}", blocks[n]) for n in sorted(blocks)]
    return out + ([("post", post)] if post else [])


def _safetensors_shape(dtype: str, shape: tuple[int, ...]) -> list[int]:
    """The catalogue's shape of a torch tensor (the inverse of
    torpor.agent.mapping.torch_shape): its own, but for F4, whose torch
    dtype packs two values a byte along the last dimension."""
    if dtype == "F4" and shape:
        return [*shape[:-1], shape[-1] * 2]
    return list(shape)


def publish_request(
    fingerprint: str,
    groups: Sequence[tuple[str, Mapping[str, torch.Tensor]]],
    *,
    device: str = "",
) -> agent_pb2.Publish:
    """The catalogue of `groups` (name, {tensor name: tensor}, in forward
    order): each tensor at the next multiple of ALIGNMENT in its group's slab."""
    out = agent_pb2.Publish(fingerprint=fingerprint, device=device)
    for name, tensors in groups:
        group = out.groups.add(name=name)
        at = 0
        for tensor_name, tensor in tensors.items():
            at = -(-at // ALIGNMENT) * ALIGNMENT
            dtype = safetensors_dtype(tensor.dtype)
            group.tensors.add(
                name=tensor_name,
                dtype=dtype,
                shape=_safetensors_shape(dtype, tuple(tensor.shape)),
                slab_offset=at,
            )
            at += tensor.numel() * tensor.element_size()
        group.size_bytes = max(at, 1)
    return out


def publish(
    model_id: str,
    fingerprint: str,
    groups: Sequence[tuple[str, Mapping[str, torch.Tensor]]],
    *,
    client: Client | None = None,
    device: str = "",
    **attach: Any,
) -> AttachedModel:
    """Publish `groups` (see publish_request) as the image `model_id` with
    `fingerprint`, and stay attached to it: the returned model's tensors
    are the published ones (read-only, bit for bit the ones given). The
    given tensors are only read; free them after. ALREADY_EXISTS
    (IMAGE_EXISTS) if an image with this fingerprint exists: attach to it."""
    import torch

    request = publish_request(fingerprint, groups, device=device)
    model = AttachedModel(model_id, client=client, publish=request, **attach)
    try:
        views = model.state_dict()
        with torch.no_grad():
            for _, tensors in groups:
                for name, tensor in tensors.items():
                    views[name].copy_(tensor.detach())
        model.commit()
    except BaseException:
        model.close()
        raise
    return model


def find_image(fingerprint: str, *, client: Client | None = None) -> str | None:
    """The id of the daemon's image with this fingerprint, if there is one
    (it may still be PUBLISHING: attach waits for nothing, so check
    `state` with get_model before attaching, or attach and retry)."""
    own = client is None
    client = client or Client()
    try:
        found = client.list_models(view=models_pb2.MODEL_VIEW_BASIC, fingerprint=fingerprint)
    finally:
        if own:
            client.close()
    return found[0].model_id if found else None
