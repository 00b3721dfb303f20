"""Layer grouping and slab packing (torpord.storage.layers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from torpor.testing import make_checkpoint, write_safetensors
from torpord.errors import InvalidArgument
from torpord.storage import (
    DEFAULT_LAYER_PATTERNS,
    MAX_LAYERS,
    Checkpoint,
    LayerPatterns,
    LayerPlan,
    compile_patterns,
    layout_hash,
    open_checkpoint,
    plan_layers,
)


def checkpoint_of(tmp_path: Path, names: list[str], nbytes: int = 3) -> Checkpoint:
    tensors = {n: ("U8", [nbytes], bytes(nbytes)) for n in names}
    return open_checkpoint(write_safetensors(tmp_path / "c.safetensors", tensors))


def grouping(plans: tuple[LayerPlan, ...]) -> dict[str, set[str]]:
    return {p.name: {pt.tensor.name for pt in p.tensors} for p in plans}


def test_llama_naming(tmp_path: Path) -> None:
    plans = plan_layers(open_checkpoint(make_checkpoint(tmp_path / "m", layers=3)))
    assert [p.name for p in plans] == ["pre", "layers.0", "layers.1", "layers.2", "post"]
    assert [p.index for p in plans] == [0, 1, 2, 3, 4]
    groups = grouping(plans)
    assert groups["pre"] == {"model.embed_tokens.weight"}
    assert groups["post"] == {"model.norm.weight", "lm_head.weight"}
    assert "model.layers.1.mlp.down_proj.weight" in groups["layers.1"]
    assert all(n.startswith("model.layers.2.") for n in groups["layers.2"])
    assert len(groups["layers.0"]) == 9


def test_gpt2_naming(tmp_path: Path) -> None:
    ckpt = open_checkpoint(make_checkpoint(tmp_path / "g", layers=2, naming="gpt2"))
    groups = grouping(plan_layers(ckpt))
    assert list(groups) == ["pre", "layers.0", "layers.1", "post"]
    assert groups["pre"] == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert groups["post"] == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    assert "transformer.h.1.attn.c_attn.weight" in groups["layers.1"]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (
            [
                "bert.embeddings.word_embeddings.weight",
                "bert.encoder.layer.0.attention.self.query.weight",
                "bert.encoder.layer.3.output.dense.weight",
                "bert.pooler.dense.weight",
                "cls.predictions.bias",
            ],
            {
                "pre": {"bert.embeddings.word_embeddings.weight"},
                "layers.0": {"bert.encoder.layer.0.attention.self.query.weight"},
                "layers.3": {"bert.encoder.layer.3.output.dense.weight"},
                "post": {"bert.pooler.dense.weight", "cls.predictions.bias"},
            },
        ),
        (
            ["encoder.layer.1.x", "embeddings.y", "classifier.weight"],
            {
                "pre": {"embeddings.y"},
                "layers.1": {"encoder.layer.1.x"},
                "post": {"classifier.weight"},
            },
        ),
        (
            [
                "gpt_neox.embed_in.weight",
                "gpt_neox.layers.0.attention.dense.weight",
                "gpt_neox.final_layer_norm.weight",
                "embed_out.weight",
            ],
            {
                "pre": {"gpt_neox.embed_in.weight"},
                "layers.0": {"gpt_neox.layers.0.attention.dense.weight"},
                "post": {"gpt_neox.final_layer_norm.weight", "embed_out.weight"},
            },
        ),
        (
            [
                "model.decoder.embed_tokens.weight",
                "model.decoder.layers.5.fc1.weight",
                "model.decoder.final_layer_norm.weight",
                "lm_head.weight",
            ],
            {
                "pre": {"model.decoder.embed_tokens.weight"},
                "layers.5": {"model.decoder.layers.5.fc1.weight"},
                "post": {"model.decoder.final_layer_norm.weight", "lm_head.weight"},
            },
        ),
        (
            ["patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight"],
            {
                "pre": {"patch_embed.proj.weight"},
                "layers.0": {"blocks.0.attn.qkv.weight"},
                "layers.1": {"blocks.1.mlp.fc1.weight"},
            },
        ),
        (
            [
                "backbone.embeddings.weight",
                "backbone.layers.0.mixer.A_log",
                "backbone.norm_f.weight",
            ],
            {
                "pre": {"backbone.embeddings.weight"},
                "layers.0": {"backbone.layers.0.mixer.A_log"},
                "post": {"backbone.norm_f.weight"},
            },
        ),
        (
            ["wte.weight", "h.0.attn.bias", "ln_f.weight", "score.weight"],
            {
                "pre": {"wte.weight"},
                "layers.0": {"h.0.attn.bias"},
                "post": {"ln_f.weight", "score.weight"},
            },
        ),
        (
            ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"],
            {
                "layers.0": {
                    "model.layers.0.self_attn.q_proj.weight",
                    "model.layers.0.self_attn.k_proj.weight",
                }
            },
        ),
    ],
    ids=[
        "bert",
        "bert-no-prefix",
        "gpt-neox",
        "opt",
        "vit-blocks",
        "mamba",
        "gpt2-bare",
        "only-blocks",
    ],
)
def test_naming_schemes(tmp_path: Path, names: list[str], expected: dict[str, set[str]]) -> None:
    plans = plan_layers(checkpoint_of(tmp_path, names))
    assert grouping(plans) == expected
    assert [p.index for p in plans] == list(range(len(plans)))


def test_block_numbers_sort_numerically_with_gaps(tmp_path: Path) -> None:
    names = [f"model.layers.{n}.w" for n in (10, 2, 0, 33)] + ["lm_head.weight"]
    plans = plan_layers(checkpoint_of(tmp_path, names))
    assert [p.name for p in plans] == ["layers.0", "layers.2", "layers.10", "layers.33", "post"]


def test_custom_patterns(tmp_path: Path) -> None:
    names = ["tok.emb", "stack.0.attn", "stack.1.attn", "stack.1.ffn", "head.out", "misc"]
    patterns = LayerPatterns(blocks=(r"^stack\.(\d+)\.",), post=(r"^head\.",))
    assert grouping(plan_layers(checkpoint_of(tmp_path, names), patterns)) == {
        "pre": {"tok.emb", "misc"},
        "layers.0": {"stack.0.attn"},
        "layers.1": {"stack.1.attn", "stack.1.ffn"},
        "post": {"head.out"},
    }
    # The defaults know nothing of "stack": everything is pre.
    assert [p.name for p in plan_layers(checkpoint_of(tmp_path, names))] == ["pre"]


def test_patterns_accept_lists_and_stay_hashable() -> None:
    patterns = LayerPatterns(blocks=[r"^b\.(\d+)\."], post=[])  # type: ignore[arg-type]
    assert patterns.blocks == (r"^b\.(\d+)\.",) and hash(patterns)
    assert compile_patterns(patterns).blocks[0].pattern == r"^b\.(\d+)\."


@pytest.mark.parametrize(
    ("patterns", "bad"),
    [
        (LayerPatterns(blocks=(r"^x\.((\d+)\.",), post=()), r"^x\.((\d+)\."),
        (LayerPatterns(blocks=(r"^x\.\d+\.",), post=()), r"^x\.\d+\."),
        (LayerPatterns(blocks=(r"^(x)\.(\d+)\.",), post=()), r"^(x)\.(\d+)\."),
        (LayerPatterns(blocks=(r"(\d+)",), post=(r"[",)), r"["),
    ],
    ids=["unbalanced", "no-group", "two-groups", "bad-post"],
)
def test_compile_patterns_names_bad_regex(patterns: LayerPatterns, bad: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        compile_patterns(patterns)
    assert info.value.reason == "INVALID_LAYER_PATTERN"
    assert repr(bad) in info.value.message and info.value.metadata["pattern"] == bad


def test_non_numeric_capture_is_an_error(tmp_path: Path) -> None:
    patterns = LayerPatterns(blocks=(r"^layer_(\w+)\.",), post=())
    with pytest.raises(InvalidArgument, match=r"'layer_a\.w'"):
        plan_layers(checkpoint_of(tmp_path, ["layer_a.w"]), patterns)


def test_default_patterns_compile() -> None:
    compiled = compile_patterns(DEFAULT_LAYER_PATTERNS)
    assert all(p.groups == 1 for p in compiled.blocks)


@pytest.mark.parametrize("alignment", [256, 512, 4096, 2**21])
def test_alignment(tmp_path: Path, alignment: int) -> None:
    ckpt = open_checkpoint(make_checkpoint(tmp_path / "m", layers=2, hidden=24, vocab=10))
    plans = plan_layers(ckpt, alignment=alignment)
    assert sum(len(p.tensors) for p in plans) == len(ckpt.tensors)
    for plan in plans:
        assert plan.size % alignment == 0 and plan.size > 0
        end = 0
        for pt in plan.tensors:
            assert pt.slab_offset % alignment == 0 and pt.slab_offset >= end
            end = pt.slab_offset + pt.tensor.nbytes
        assert end <= plan.size < end + alignment


def test_packing_is_tight_and_in_file_order(tmp_path: Path) -> None:
    ckpt = open_checkpoint(make_checkpoint(tmp_path / "m", layers=1, hidden=64, shards=3))
    for plan in plan_layers(ckpt):
        keys = [(pt.tensor.file_index, pt.tensor.file_offset) for pt in plan.tensors]
        assert keys == sorted(keys)
        expected, end = [], 0
        for pt in plan.tensors:
            start = -(-end // 256) * 256
            expected.append(start)
            end = start + pt.tensor.nbytes
        assert [pt.slab_offset for pt in plan.tensors] == expected
        assert plan.size == -(-end // 256) * 256


def test_specific_offsets(tmp_path: Path) -> None:
    tensors = {
        "model.layers.0.a": ("U8", [300], bytes(300)),
        "model.layers.0.b": ("U8", [1], b"x"),
        "model.layers.0.c": ("U8", [0], b""),
        "model.layers.0.d": ("U8", [256], bytes(256)),
    }
    ckpt = open_checkpoint(write_safetensors(tmp_path / "c.safetensors", tensors))
    (plan,) = plan_layers(ckpt)
    offsets = {pt.tensor.name: pt.slab_offset for pt in plan.tensors}
    assert [pt.tensor.name for pt in plan.tensors] == [
        "model.layers.0.a",
        "model.layers.0.b",
        "model.layers.0.c",
        "model.layers.0.d",
    ]
    assert offsets == {
        "model.layers.0.a": 0,
        "model.layers.0.b": 512,
        "model.layers.0.c": 768,
        "model.layers.0.d": 768,
    }
    assert plan.size == 1024


@pytest.mark.parametrize("alignment", [0, 128, 255, 300, 768, -256])
def test_bad_alignment(tmp_path: Path, alignment: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        plan_layers(checkpoint_of(tmp_path, ["w"]), alignment=alignment)
    assert info.value.reason == "INVALID_ALIGNMENT" and str(alignment) in info.value.message


def test_empty_checkpoint(tmp_path: Path) -> None:
    for name, tensors in [("none", {}), ("zeros", {"w": ("F16", [0, 4], b"")})]:
        ckpt = open_checkpoint(write_safetensors(tmp_path / f"{name}.safetensors", tensors))
        with pytest.raises(InvalidArgument) as info:
            plan_layers(ckpt)
        assert info.value.reason == "EMPTY_CHECKPOINT"


def test_zero_byte_tensors_are_kept(tmp_path: Path) -> None:
    tensors = {
        "model.embed_tokens.weight": ("U8", [8], bytes(8)),
        "model.layers.0.empty": ("F32", [0], b""),
        "model.layers.1.w": ("U8", [1], b"x"),
    }
    plans = plan_layers(open_checkpoint(write_safetensors(tmp_path / "c.safetensors", tensors)))
    assert [p.name for p in plans] == ["pre", "layers.0", "layers.1"]
    # A layer of only zero-byte tensors still gets a mappable (non-empty) slab.
    assert plans[1].tensors[0].tensor.nbytes == 0 and plans[1].size == 256


def test_layout_hash(tmp_path: Path) -> None:
    one = open_checkpoint(make_checkpoint(tmp_path / "one", layers=2))
    two = open_checkpoint(make_checkpoint(tmp_path / "two", layers=2, shards=2))
    base = layout_hash(plan_layers(one))
    assert len(base) == 16 and int(base, 16) >= 0
    assert layout_hash(plan_layers(one)) == base
    # Where the bytes come from doesn't change what an engine sees.
    assert layout_hash(plan_layers(two)) == base
    assert layout_hash(plan_layers(one, alignment=512)) != base
    other_dtype = open_checkpoint(make_checkpoint(tmp_path / "bf", layers=2, dtype="BF16"))
    assert layout_hash(plan_layers(other_dtype)) != base
    other_shape = open_checkpoint(make_checkpoint(tmp_path / "h", layers=2, hidden=32))
    assert layout_hash(plan_layers(other_shape)) != base
    assert layout_hash(list(plan_layers(one))) == base


def test_a_model_has_at_most_max_layers(tmp_path: Path) -> None:
    # One zero-byte tensor per block number: a tiny header, thousands of slabs.
    names = [f"model.layers.{n}.w" for n in range(MAX_LAYERS)] + ["lm_head.weight"]
    tensors = {name: ("U8", [0], b"") for name in names}
    tensors["model.embed_tokens.weight"] = ("U8", [4], bytes(4))
    ckpt = open_checkpoint(write_safetensors(tmp_path / "c.safetensors", tensors))
    with pytest.raises(InvalidArgument) as info:
        plan_layers(ckpt)
    err = info.value
    assert err.reason == "CHECKPOINT_TOO_LARGE" and err.metadata["limit"] == str(MAX_LAYERS)
    assert f"make {MAX_LAYERS + 2} layers" in err.message
    del tensors["lm_head.weight"], tensors["model.layers.0.w"]
    ckpt = open_checkpoint(write_safetensors(tmp_path / "d.safetensors", tensors))
    assert len(plan_layers(ckpt)) == MAX_LAYERS
