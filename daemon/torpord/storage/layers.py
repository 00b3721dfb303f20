"""Grouping a checkpoint's tensors into layers and packing each into a slab.

A layer is the unit the daemon moves: `pre` (embeddings and anything before
the blocks), one `layers.N` per transformer block, and `post` (final norm,
heads). Block membership comes from tensor names matched against regexes with
one capture group, the block number. Within a slab, tensors follow file order
so one layer's reads are as sequential as the source allows.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from torpor import layout

from torpord.errors import InvalidArgument
from torpord.storage.safetensors import Checkpoint, TensorInfo

__all__ = [
    "DEFAULT_LAYER_PATTERNS",
    "MAX_LAYERS",
    "CompiledLayerPatterns",
    "LayerPatterns",
    "LayerPlan",
    "PackedTensor",
    "compile_patterns",
    "layout_hash",
    "plan_layers",
]

MIN_ALIGNMENT = 256
#: Layers of one model: each is a slab (an fd, a mapping, a transfer) and is
#: listed in every snapshot. Real models have at most a few hundred blocks;
#: tensor names alone (`model.layers.N.` for a million N) must not make more.
MAX_LAYERS = 4096


@dataclass(frozen=True, slots=True)
class LayerPatterns:
    """Regexes (applied with `re.search`) that sort tensor names into layers.

    `blocks` patterns have exactly one group capturing the block number; the
    first pattern that matches wins. A tensor matching no block pattern goes to
    `post` if a `post` pattern matches, else to `pre`.
    """

    blocks: tuple[str, ...]
    post: tuple[str, ...]

    def __post_init__(self) -> None:
        # Config loaders hand us lists; keep the object hashable (and frozen
        # in fact, not just in name) by storing tuples.
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "post", tuple(self.post))


DEFAULT_LAYER_PATTERNS = LayerPatterns(
    blocks=(
        r"^model\.layers\.(\d+)\.",  # Llama, Mistral, Qwen, Gemma, Phi-3
        r"^model\.decoder\.layers\.(\d+)\.",  # OPT, BART-style decoders
        r"^gpt_neox\.layers\.(\d+)\.",  # GPT-NeoX, Pythia
        r"^(?:transformer\.)?h\.(\d+)\.",  # GPT-2 (with or without prefix), Falcon, BLOOM
        r"^(?:\w+\.)?encoder\.layer\.(\d+)\.",  # BERT, RoBERTa (bert.encoder.layer.N)
        r"^backbone\.layers\.(\d+)\.",  # Mamba
        r"^blocks\.(\d+)\.",  # ViT/timm-style
        r"^layers\.(\d+)\.",  # Meta "consolidated" format
    ),
    post=(
        r"^model\.norm\.",
        r"^(?:transformer\.)?ln_f\.",
        r"(?:^|\.)final_layer_norm\.",
        r"(?:^|\.)final_layernorm\.",
        r"(?:^|\.)norm_f\.",
        r"^norm\.",
        r"^lm_head\.",
        r"^embed_out\.",  # GPT-NeoX's output projection
        r"^output\.",  # Meta "consolidated" format's output projection
        r"(?:^|\.)pooler\.",
        r"^cls\.",
        r"^score\.",
        r"^classifier\.",
    ),
)


@dataclass(frozen=True, slots=True)
class CompiledLayerPatterns:
    """LayerPatterns, compiled and checked."""

    blocks: tuple[re.Pattern[str], ...]
    post: tuple[re.Pattern[str], ...]


@dataclass(frozen=True, slots=True)
class PackedTensor:
    """A tensor and where it sits in its layer's slab."""

    tensor: TensorInfo
    slab_offset: int


# weakref_slot: the server keeps a layer's converted tensor list for as long
# as the plan lives.
@dataclass(frozen=True, slots=True, weakref_slot=True)
class LayerPlan:
    """One layer: its tensors packed into one slab of `size` bytes."""

    name: str  # "pre", "layers.N" or "post"
    index: int  # forward order
    tensors: tuple[PackedTensor, ...]
    size: int


def _compile(kind: str, i: int, pattern: str, groups: int | None) -> re.Pattern[str]:
    meta = {"pattern": pattern, "kind": kind, "index": i}
    try:
        compiled = re.compile(pattern)
    except (re.error, TypeError) as err:
        raise InvalidArgument(
            f"layer pattern {kind}[{i}] {pattern!r} is not a valid regex: {err}",
            reason="INVALID_LAYER_PATTERN",
            metadata=meta,
        ) from err
    if groups is not None and compiled.groups != groups:
        raise InvalidArgument(
            f"layer pattern {kind}[{i}] {pattern!r} has {compiled.groups} groups; it needs "
            "exactly one, capturing the block number",
            reason="INVALID_LAYER_PATTERN",
            metadata=meta,
        )
    return compiled


@functools.lru_cache(maxsize=32)
def compile_patterns(patterns: LayerPatterns) -> CompiledLayerPatterns:
    """Compile and check `patterns`; InvalidArgument names the bad regex."""
    return CompiledLayerPatterns(
        blocks=tuple(_compile("blocks", i, p, 1) for i, p in enumerate(patterns.blocks)),
        post=tuple(_compile("post", i, p, None) for i, p in enumerate(patterns.post)),
    )


def _classify(name: str, patterns: CompiledLayerPatterns) -> int | str:
    """The block number of `name`, or "pre" / "post"."""
    for pattern in patterns.blocks:
        m = pattern.search(name)
        if m:
            try:
                return int(m.group(1))
            except (TypeError, ValueError) as err:
                raise InvalidArgument(
                    f"layer pattern {pattern.pattern!r} matched tensor {name!r} but captured "
                    f"{m.group(1)!r}, not a block number",
                    reason="INVALID_LAYER_PATTERN",
                    metadata={"pattern": pattern.pattern, "tensor": name},
                ) from err
    if any(p.search(name) for p in patterns.post):
        return "post"
    return "pre"


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) & ~(alignment - 1)


def _pack(name: str, index: int, tensors: list[TensorInfo], alignment: int) -> LayerPlan:
    packed: list[PackedTensor] = []
    end = 0
    for t in sorted(tensors, key=lambda t: (t.file_index, t.file_offset, t.nbytes, t.name)):
        offset = _align(end, alignment)
        packed.append(PackedTensor(t, offset))
        end = offset + t.nbytes
    # A layer of only zero-byte tensors still gets one aligned unit: a slab
    # of size 0 can be neither allocated nor mapped by the backends.
    return LayerPlan(name, index, tuple(packed), max(_align(end, alignment), alignment))


def plan_layers(
    checkpoint: Checkpoint,
    patterns: LayerPatterns = DEFAULT_LAYER_PATTERNS,
    alignment: int = MIN_ALIGNMENT,
) -> tuple[LayerPlan, ...]:
    """Group `checkpoint`'s tensors into layers in forward order and pack each.

    Order: `pre`, `layers.N` by ascending block number (gaps allowed), `post`;
    empty groups are left out. Every tensor starts at a multiple of
    `alignment` (a power of two >= 256) within its slab.
    """
    if alignment < MIN_ALIGNMENT or alignment & (alignment - 1):
        raise InvalidArgument(
            f"slab alignment {alignment} is not a power of two >= {MIN_ALIGNMENT}",
            reason="INVALID_ALIGNMENT",
            metadata={"alignment": alignment},
        )
    if checkpoint.data_bytes == 0:
        raise InvalidArgument(
            f"{checkpoint.path}: checkpoint has no tensor data "
            f"({len(checkpoint.tensors)} tensors, 0 bytes)",
            reason="EMPTY_CHECKPOINT",
            metadata={"file": checkpoint.path},
        )
    compiled = compile_patterns(patterns)
    pre: list[TensorInfo] = []
    post: list[TensorInfo] = []
    blocks: dict[int, list[TensorInfo]] = {}
    for t in checkpoint.tensors:
        where = _classify(t.name, compiled)
        if where == "pre":
            pre.append(t)
        elif where == "post":
            post.append(t)
        else:
            assert isinstance(where, int)
            blocks.setdefault(where, []).append(t)
    groups = [("pre", pre)]
    groups += [(f"layers.{n}", blocks[n]) for n in sorted(blocks)]
    groups.append(("post", post))
    nonempty = [(name, ts) for name, ts in groups if ts]
    if len(nonempty) > MAX_LAYERS:
        raise InvalidArgument(
            f"{checkpoint.path}: its tensors make {len(nonempty)} layers, more than the"
            f" {MAX_LAYERS} a model may have",
            reason="CHECKPOINT_TOO_LARGE",
            metadata={"file": checkpoint.path, "limit": MAX_LAYERS},
        )
    return tuple(_pack(name, i, ts, alignment) for i, (name, ts) in enumerate(nonempty))


def layout_hash(plans: tuple[LayerPlan, ...] | list[LayerPlan]) -> str:
    """The hash of what an engine's views depend on (torpor.layout, which the
    agent checks against the model's view it reserved): names, dtypes,
    shapes, offsets, sizes; not where the bytes come from."""
    return layout.layout_hash(
        layout.LayerLayout(
            p.name,
            p.index,
            p.size,
            tuple(
                layout.TensorLayout(
                    pt.tensor.name,
                    pt.tensor.dtype,
                    tuple(pt.tensor.shape),
                    pt.slab_offset,
                    pt.tensor.nbytes,
                )
                for pt in p.tensors
            ),
        )
        for p in plans
    )
