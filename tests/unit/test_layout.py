"""The layout hash (torpor.layout): what it covers and what it does not."""

from __future__ import annotations

import dataclasses

import pytest
from torpor.layout import LayerLayout, TensorLayout, layout_hash

W = TensorLayout("model.layers.0.w", "BF16", (4, 8), 0, 64)
B = TensorLayout("model.layers.0.b", "F32", (8,), 256, 32)
LAYOUT = (
    LayerLayout("pre", 0, 256, (TensorLayout("embed", "F32", (2, 4), 0, 32),)),
    LayerLayout("layers.0", 1, 512, (W, B)),
)


def test_the_hash_is_16_hex_digits_and_stable() -> None:
    h = layout_hash(LAYOUT)
    assert len(h) == 16 and int(h, 16) >= 0
    assert layout_hash(list(LAYOUT)) == h
    assert layout_hash(iter(LAYOUT)) == h


@pytest.mark.parametrize(
    "change",
    [
        {"name": "model.layers.0.v"},
        {"dtype": "F16"},
        {"shape": (8, 4)},
        {"slab_offset": 512},
        {"nbytes": 128},
    ],
)
def test_every_tensor_field_counts(change: dict[str, object]) -> None:
    changed = dataclasses.replace(W, **change)
    other = (LAYOUT[0], dataclasses.replace(LAYOUT[1], tensors=(changed, B)))
    assert layout_hash(other) != layout_hash(LAYOUT)


@pytest.mark.parametrize("change", [{"name": "layers.1"}, {"index": 2}, {"size": 1024}])
def test_every_layer_field_counts(change: dict[str, object]) -> None:
    other = (LAYOUT[0], dataclasses.replace(LAYOUT[1], **change))
    assert layout_hash(other) != layout_hash(LAYOUT)


def test_order_counts() -> None:
    assert layout_hash(LAYOUT[::-1]) != layout_hash(LAYOUT)
    swapped = (LAYOUT[0], dataclasses.replace(LAYOUT[1], tensors=(B, W)))
    assert layout_hash(swapped) != layout_hash(LAYOUT)


def test_a_tensor_moved_to_another_layer_counts() -> None:
    moved = (
        dataclasses.replace(LAYOUT[0], tensors=(*LAYOUT[0].tensors, B)),
        dataclasses.replace(LAYOUT[1], tensors=(W,)),
    )
    assert layout_hash(moved) != layout_hash(LAYOUT)
