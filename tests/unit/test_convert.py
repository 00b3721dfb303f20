"""Snapshots to torpor.v1 messages: the FULL view's tensor lists (torpord.server.convert)."""

from __future__ import annotations

import gc
from pathlib import Path

from torpor.testing import make_checkpoint, write_safetensors
from torpor.v1 import common_pb2
from torpord.core.model import LayerState, Model, ModelSnapshot
from torpord.server import convert
from torpord.server.convert import model_to_proto, prepare_full
from torpord.storage import open_checkpoint, plan_layers

from tests.core.harness import Harness


def expected_tensors(m: ModelSnapshot) -> list[list[common_pb2.Tensor]]:
    return [
        [
            common_pb2.Tensor(
                name=p.tensor.name,
                dtype=p.tensor.dtype,
                shape=p.tensor.shape,
                slab_offset=p.slab_offset,
                size_bytes=p.tensor.nbytes,
                file_index=p.tensor.file_index,
                file_offset=p.tensor.file_offset,
            )
            for p in layer.plan.tensors
        ]
        for layer in m.layers
    ]


async def test_full_view_lists_every_tensor_in_order(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        # More tensors in one layer than one conversion step takes.
        count = 3 * convert._PIECE + 5
        tensors = {f"t{i:05d}": ("U8", [0], b"") for i in range(count)}
        tensors["w"] = ("U8", [4], b"abcd")
        big = await h.manager.load(
            "big", str(write_safetensors(tmp_path / "b.safetensors", tensors))
        )
        small = await h.manager.load(
            "small", str(make_checkpoint(tmp_path / "s", layers=2, shards=2))
        )
        for m in (big, small):
            await prepare_full([m])
            for _ in range(2):  # converted once, the same every time
                msg = model_to_proto(m, full=True)
                assert [list(layer.tensors) for layer in msg.layers] == expected_tensors(m)
            basic = model_to_proto(m)
            assert all(not layer.tensors for layer in basic.layers)
            assert [layer.tensor_count for layer in basic.layers] == [
                len(layer.plan.tensors) for layer in m.layers
            ]
        assert (
            sum(len(layer.tensors) for layer in model_to_proto(big, full=True).layers) == count + 1
        )
    finally:
        await h.close()


def snapshot_of(path: Path) -> ModelSnapshot:
    plans = plan_layers(open_checkpoint(path))
    return Model("m", open_checkpoint(path), "dev", [LayerState(p) for p in plans]).snapshot()


async def test_a_converted_list_goes_with_its_plan(tmp_path: Path) -> None:
    before = len(convert._TENSORS)
    m = snapshot_of(make_checkpoint(tmp_path / "m", layers=3))
    await prepare_full([m])
    assert len(convert._TENSORS) == before + len(m.layers)
    del m
    gc.collect()
    assert len(convert._TENSORS) == before
