"""An image's catalogue: the groups of tensors an engine publishes, checked.

A publishing engine (torpor.agent's `publish`) says, for each group in
forward order, its slab's size and where each of its tensors sits (name,
safetensors dtype, shape, offset). Nothing of it comes from a file, so it
is checked as strictly as a header: known dtypes, whole bytes, offsets that
are multiples of MIN_ALIGNMENT, spans inside their slab and not
overlapping, names unique; the result is the same records a checkpoint's
layers are planned into (a Checkpoint with no files, whose `fingerprint`
says what it is, and its LayerPlans), so everything after publishing
treats an image like a loaded model. Errors name groups and tensors by
position and quote only the names the caller chose.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

from torpord.errors import InvalidArgument
from torpord.storage.layers import MAX_LAYERS, MIN_ALIGNMENT, LayerPlan, PackedTensor
from torpord.storage.safetensors import DTYPES, MAX_TENSORS, Checkpoint, TensorInfo

__all__ = [
    "MAX_FINGERPRINT",
    "MAX_GROUP_BYTES",
    "MAX_GROUP_TENSORS",
    "CatalogueGroup",
    "CatalogueTensor",
    "check_fingerprint",
    "plan_image",
]

MAX_FINGERPRINT = 1024  # bytes
MAX_GROUP_TENSORS = 65536
MAX_GROUP_BYTES = 1 << 40  # one slab: far beyond any device
MAX_RANK = 16
MAX_TENSOR_NAME = 1024  # bytes (a checkpoint's names are far shorter)
GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class CatalogueTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    slab_offset: int


@dataclass(frozen=True)
class CatalogueGroup:
    name: str
    size: int
    tensors: tuple[CatalogueTensor, ...]


def _bad(message: str, **metadata: object) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_CATALOGUE", metadata=metadata)


def check_fingerprint(fingerprint: str) -> None:
    size = len(fingerprint.encode(errors="surrogatepass"))
    if not fingerprint or size > MAX_FINGERPRINT:
        raise InvalidArgument(
            f"an image's fingerprint is 1 to {MAX_FINGERPRINT} bytes, not {size}",
            reason="INVALID_FINGERPRINT",
            metadata={"size": size},
        )
    if not fingerprint.isprintable():
        raise InvalidArgument(
            "an image's fingerprint must be printable text (no control characters)",
            reason="INVALID_FINGERPRINT",
        )


def _tensor_bytes(t: CatalogueTensor, where: str, **at: object) -> int:
    bits = DTYPES.get(t.dtype)
    if bits is None:
        raise _bad(f"{where} has an unknown dtype {t.dtype[:32]!r}", dtype=t.dtype[:32], **at)
    if len(t.shape) > MAX_RANK or any(d < 0 for d in t.shape):
        raise _bad(f"{where} has a shape of more than {MAX_RANK} dims or a negative one", **at)
    total = math.prod(t.shape) * bits
    if total % 8:
        raise _bad(f"{where}: {math.prod(t.shape)} {t.dtype} items are not whole bytes", **at)
    return total // 8


def plan_image(
    fingerprint: str, groups: Sequence[CatalogueGroup]
) -> tuple[Checkpoint, tuple[LayerPlan, ...]]:
    """The image's records: a file-less Checkpoint and one LayerPlan per
    group, in the order given; InvalidArgument (INVALID_CATALOGUE) naming
    the first thing wrong, before anything is allocated."""
    check_fingerprint(fingerprint)
    if not groups or len(groups) > MAX_LAYERS:
        raise _bad(f"an image has 1 to {MAX_LAYERS} groups, not {len(groups)}")
    seen_groups: set[str] = set()
    seen_tensors: set[str] = set()
    infos: list[TensorInfo] = []
    plans: list[LayerPlan] = []
    count = 0
    for gi, group in enumerate(groups):
        gwhere = f"group {gi} ({group.name[:128]!r})"
        if not GROUP_NAME.fullmatch(group.name):
            raise _bad(
                f"group {gi}'s name must be 1 to 128 characters of [A-Za-z0-9._-],"
                " starting with a letter or digit",
                group=gi,
            )
        if group.name in seen_groups:
            raise _bad(f"{gwhere} is named twice", group=group.name)
        seen_groups.add(group.name)
        if not 0 < group.size <= MAX_GROUP_BYTES:
            raise _bad(f"{gwhere} has size {group.size}; 1 byte to 1 TiB", group=group.name)
        count += len(group.tensors)
        if not group.tensors or len(group.tensors) > MAX_GROUP_TENSORS or count > MAX_TENSORS:
            raise _bad(
                f"{gwhere} has {len(group.tensors)} tensors: each group has 1 to"
                f" {MAX_GROUP_TENSORS}, and an image at most {MAX_TENSORS}",
                group=group.name,
            )
        packed: list[PackedTensor] = []
        for ti, t in enumerate(group.tensors):
            where = f"tensor {ti} of {gwhere}"
            size = len(t.name.encode(errors="surrogatepass"))
            if not t.name or size > MAX_TENSOR_NAME or not t.name.isprintable():
                raise _bad(
                    f"{where} needs a printable name of 1 to {MAX_TENSOR_NAME} bytes",
                    group=group.name,
                    tensor=ti,
                )
            if t.name in seen_tensors:
                raise _bad(f"{where}: {t.name[:128]!r} is named twice", group=group.name, tensor=ti)
            seen_tensors.add(t.name)
            nbytes = _tensor_bytes(t, where, group=group.name, tensor=ti)
            if t.slab_offset < 0 or t.slab_offset % MIN_ALIGNMENT:
                raise _bad(
                    f"{where} starts at {t.slab_offset}, which is "
                    + ("negative" if t.slab_offset < 0 else f"not a multiple of {MIN_ALIGNMENT}"),
                    group=group.name,
                    tensor=ti,
                )
            if t.slab_offset + nbytes > group.size:
                raise _bad(
                    f"{where}: {nbytes} bytes at {t.slab_offset} do not fit the group's"
                    f" {group.size}",
                    group=group.name,
                    tensor=ti,
                )
            info = TensorInfo(t.name, t.dtype, t.shape, -1, 0, nbytes)
            infos.append(info)
            packed.append(PackedTensor(info, t.slab_offset))
        spans = sorted(
            (p.slab_offset, p.slab_offset + p.tensor.nbytes, p.tensor.name)
            for p in packed
            if p.tensor.nbytes  # (an empty tensor may sit anywhere)
        )
        for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
            if begin < end:
                raise _bad(
                    f"{gwhere}: tensors {first[:128]!r} and {second[:128]!r} overlap",
                    group=group.name,
                )
        plans.append(LayerPlan(group.name, gi, tuple(packed), group.size))
    checkpoint = Checkpoint("", (), tuple(infos), MappingProxyType({}), fingerprint)
    return checkpoint, tuple(plans)
