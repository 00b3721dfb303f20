"""One attachment's layout in this process: a reserved range per layer, the
tensors on them, and mapping the daemon's slabs into those ranges.

The ranges are `torpor.agent.mapping.SlabRange` (memfd slabs, host memory)
or `torpor.agent.cuda.CudaSlabRange` (a GPU's VMM slabs), reserved once for
the life of the attachment: mapping puts a slab at its layer's fixed address,
unmapping leaves the range reserved, so the tensors stay valid across sleep
and wake. What may map or unmap when is the gate's business
(`torpor.agent._gate`); this module only does it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc

from torpor import layout
from torpor.agent.mapping import SlabRange
from torpor.errors import TorporError
from torpor.v1 import common_pb2

if TYPE_CHECKING:
    import torch

__all__ = ["Layout", "layout_changed", "layout_of"]


@dataclass
class _Layer:
    name: str
    index: int
    range: SlabRange


class Layout:
    """The layers of one model as this process maps them (not thread-safe:
    the gate serialises the changes)."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self._layers: dict[str, _Layer] = {}
        self._order: list[str] = []  # layer names in forward order
        self._tensors: dict[str, torch.Tensor] = {}
        self._tensor_layer: dict[str, str] = {}
        self._ordinal: int | None = None  # this process's CUDA number for the GPU

    def reserve(
        self,
        model: common_pb2.Model,
        *,
        layout_hash: str,
        slab_kind: str,
        device: str,
        device_index: int,
    ) -> None:
        """One address range per layer of `model` (its full view), reserved for
        the life of the attachment, and the tensors on them (valid whenever
        their layer is mapped). `layout_hash` is the one the daemon attached
        with: a view of another layout (the model was loaded again between
        the two) is LAYOUT_CHANGED, before anything is reserved."""
        if layout_hash and layout.layout_hash(layout_of(model)) != layout_hash:
            raise layout_changed(self.model_id)
        for index, layer in enumerate(model.layers):
            lay = _Layer(
                layer.name,
                index,
                self._range(int(layer.size_bytes), slab_kind, device, device_index),
            )
            self._layers[layer.name] = lay
            self._order.append(layer.name)
            for t in layer.tensors:
                self._tensors[t.name] = lay.range.tensor(t.slab_offset, t.dtype, list(t.shape))
                self._tensor_layer[t.name] = layer.name

    def _range(self, size: int, slab_kind: str, device: str, device_index: int) -> SlabRange:
        if slab_kind == "cuda":
            from torpor.agent.cuda import CudaSlabRange, ordinal_of

            if self._ordinal is None:
                self._ordinal = ordinal_of(device) if device else device_index
            return cast(SlabRange, CudaSlabRange(size, self._ordinal))
        if slab_kind != "memfd":
            raise TorporError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "UNSUPPORTED_SLABS",
                f"this agent cannot map {slab_kind!r} slabs: upgrade torpor",
            )
        return SlabRange(size)

    # -- what the engine sees --------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        """The layer names in forward order."""
        return list(self._order)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)

    def layer_of(self, tensor_name: str) -> str:
        return self._tensor_layer[tensor_name]

    def ranges(self) -> dict[str, tuple[int, int]]:
        return {name: (lay.range.address, lay.range.size) for name, lay in self._layers.items()}

    def name_of(self, layer: str | int) -> str:
        """A layer's name, given it or its index in forward order; KeyError
        naming it if the model has no such layer (an index past the last is
        IndexError)."""
        name = self._order[layer] if isinstance(layer, int) else layer
        if name not in self._layers:
            raise KeyError(f"model {self.model_id!r} has no layer {layer!r}")
        return name

    # -- the gate's Weights ----------------------------------------------------------

    def mapped(self, layer: str) -> bool:
        lay = self._layers.get(layer)  # (none once released: a close raced the caller)
        return lay is not None and lay.range.mapped

    def all_mapped(self) -> bool:
        return all(lay.range.mapped for lay in self._layers.values())

    def unmap(self, layers: Sequence[str] = ()) -> None:
        for lay in self._layers.values():
            if (not layers or lay.name in layers) and lay.range.mapped:
                lay.range.unmap()

    def release(self) -> None:
        for lay in self._layers.values():
            lay.range.release()
        self._layers.clear()
        self._tensors.clear()

    # -- the daemon's slabs ----------------------------------------------------------

    def map(
        self, sent: Sequence[Mapping[str, Any]], fds: Sequence[int], *, writable: bool = False
    ) -> None:
        """Map each slab the fd socket sent (its header's layers: name and
        size, one fd each, in order) at its layer's range (`writable` while
        publishing it); the fds stay the caller's. A layer this layout lacks,
        or of another size, is LAYOUT_CHANGED: the tensors cannot be remapped."""
        for layer, fd in zip(sent, fds, strict=True):
            lay = self._layers.get(layer["name"])
            if lay is None or int(layer["size"]) != lay.range.size:
                raise layout_changed(self.model_id, layer["name"])
            lay.range.map(fd, writable=writable)


def layout_of(model: common_pb2.Model) -> tuple[layout.LayerLayout, ...]:
    """The layout a model's full view describes (what torpor.layout hashes)."""
    return tuple(
        layout.LayerLayout(
            layer.name,
            layer.index,
            layer.size_bytes,
            tuple(
                layout.TensorLayout(t.name, t.dtype, tuple(t.shape), t.slab_offset, t.size_bytes)
                for t in layer.tensors
            ),
        )
        for layer in model.layers
    )


def layout_changed(model_id: str, layer: str = "") -> TorporError:
    what = f"layer {layer} of " if layer else ""
    return TorporError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "LAYOUT_CHANGED",
        f"the layout of {what}model {model_id!r} changed since this engine attached;"
        " its tensors cannot be remapped: attach again",
    )
