"""The layout hash: what an engine's tensor views depend on, as one string.

The daemon hashes the layout it planned (torpord.storage.layers) and sends
the hash in Attached and Resume; the agent hashes the layout it reserved
from the model's full view (GetModel) and checks the two agree, so tensors
are never built on a layout other than the one the daemon maps.

What is hashed: each layer's name, index and slab size, and each tensor's
name, dtype, shape, offset in the slab and size, in slab order. Where the
bytes come from (source files, offsets in them) is left out on purpose: the
same layout read from a re-sharded copy of a checkpoint is the same layout
to an engine. The hash is XXH3-64, hex (16 digits).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import xxhash

__all__ = ["LayerLayout", "TensorLayout", "layout_hash"]


@dataclass(frozen=True, slots=True)
class TensorLayout:
    name: str
    dtype: str  # a safetensors dtype: F32, BF16, ...
    shape: tuple[int, ...]
    slab_offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class LayerLayout:
    name: str  # "pre", "layers.N" or "post"
    index: int  # forward order
    size: int  # the slab's bytes
    tensors: tuple[TensorLayout, ...]  # in slab order


def layout_hash(layers: Iterable[LayerLayout]) -> str:
    """The layout's hash (16 hex digits); layers in forward order."""
    canonical = [
        [
            layer.name,
            layer.index,
            layer.size,
            [[t.name, t.dtype, list(t.shape), t.slab_offset, t.nbytes] for t in layer.tensors],
        ]
        for layer in layers
    ]
    encoded = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False)
    return xxhash.xxh3_64_hexdigest(encoded.encode("utf-8"))
