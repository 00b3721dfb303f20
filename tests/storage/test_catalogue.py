"""An image's catalogue (torpord.storage.catalogue): every refusal names
the group and tensor by position and quotes at most the caller's own names,
clipped; what is accepted is planned exactly as given."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from torpor import layout
from torpord.errors import InvalidArgument
from torpord.storage.catalogue import (
    MAX_FINGERPRINT,
    MAX_GROUP_BYTES,
    MAX_GROUP_TENSORS,
    CatalogueGroup,
    CatalogueTensor,
    plan_image,
)
from torpord.storage.layers import MAX_LAYERS, layout_hash
from torpord.storage.safetensors import MAX_TENSORS

FP = "engine/fp"
# What a careless message would quote: longer than any clip, so a test can
# tell a clipped quote from the whole.
LONG = "n" * 1100 + "TAIL"


def t(name: str, dtype: str = "F32", shape: Sequence[int] = (4,), at: int = 0) -> CatalogueTensor:
    return CatalogueTensor(name, dtype, tuple(shape), at)


def g(name: str, *tensors: CatalogueTensor, size: int = 4096) -> CatalogueGroup:
    return CatalogueGroup(name, size, tensors)


def refused(groups: Sequence[CatalogueGroup], fingerprint: str = FP) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        plan_image(fingerprint, groups)
    err = info.value
    assert err.reason in ("INVALID_CATALOGUE", "INVALID_FINGERPRINT")
    # Nothing the caller sent is quoted whole when it is long.
    said = err.message + repr(err.metadata)
    assert "TAIL" not in said
    assert len(err.message) < 600
    return err


def test_accepts_and_plans_in_the_order_given() -> None:
    groups = [
        g("pre", t("embed", "BF16", (8, 16), 0), size=256),
        g(
            "layers.0",
            # Out of offset order on purpose: kept as given.
            t("b", "F32", (10,), 512),
            t("a", "F16", (3, 5), 0),
            t("empty", "I64", (0, 7), 256),  # (zero bytes)
            t("scalar", "U8", (), 768),
            size=1024,
        ),
        g("my-own_name.x", t("q", "F4", (2, 3), 0), t("f6", "F6_E2M3", (4,), 256), size=300),
        g("post", t("bool", "BOOL", (5,), 0), size=5),
    ]
    checkpoint, plans = plan_image(FP, groups)
    assert checkpoint.fingerprint == FP and checkpoint.files == ()
    assert [p.name for p in plans] == ["pre", "layers.0", "my-own_name.x", "post"]
    assert [p.index for p in plans] == [0, 1, 2, 3]
    assert [p.size for p in plans] == [256, 1024, 300, 5]
    got = [[(pt.tensor.name, pt.slab_offset, pt.tensor.nbytes) for pt in p.tensors] for p in plans]
    assert got == [
        [("embed", 0, 256)],
        [("b", 512, 40), ("a", 0, 30), ("empty", 256, 0), ("scalar", 768, 1)],
        [("q", 0, 3), ("f6", 256, 3)],
        [("bool", 0, 5)],
    ]
    assert [ti.name for ti in checkpoint.tensors] == [
        "embed",
        "b",
        "a",
        "empty",
        "scalar",
        "q",
        "f6",
        "bool",
    ]
    # The hash an agent computes from the catalogue alone (torpor.layout)
    # is the daemon's.
    sizes = {"BF16": 2, "F32": 4, "F16": 2, "I64": 8, "U8": 1, "BOOL": 1}
    bits = {"F4": 4, "F6_E2M3": 6}
    want = layout.layout_hash(
        layout.LayerLayout(
            group.name,
            index,
            group.size,
            tuple(
                layout.TensorLayout(
                    x.name,
                    x.dtype,
                    x.shape,
                    x.slab_offset,
                    _prod(x.shape) * sizes[x.dtype]
                    if x.dtype in sizes
                    else _prod(x.shape) * bits[x.dtype] // 8,
                )
                for x in group.tensors
            ),
        )
        for index, group in enumerate(groups)
    )
    assert layout_hash(plans) == want


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def test_zero_byte_tensors_may_sit_anywhere() -> None:
    _, (plan,) = plan_image(
        FP,
        [
            g(
                "pre",
                t("w", "F32", (256,), 0),  # bytes 0..1024
                t("inside", "F32", (0,), 256),
                t("also", "BF16", (4, 0, 9), 256),
                t("at-end", "U8", (0,), 1024),
                size=1024,
            )
        ],
    )
    assert [pt.tensor.nbytes for pt in plan.tensors] == [1024, 0, 0, 0]


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        (t("w", "Q8"), "unknown dtype 'Q8'"),
        (t("w", "f32"), "unknown dtype"),
        (t("w", "F4", (3,)), "not whole bytes"),
        (t("w", "F4", ()), "not whole bytes"),
        (t("w", "F6_E3M2", (2, 3)), "not whole bytes"),
        (t("w", "F32", (4, -1)), "negative"),
        (t("w", "F32", (1,) * 17), "more than 16 dims"),
        (t("w", "F32", (4,), 100), "not a multiple of 256"),
        (t("w", "F32", (4,), 4096), "do not fit"),
        (t("w", "F32", (1025,), 0), "do not fit"),
        (t("w", "F32", (2**62, 2**62), 0), "do not fit"),
        (t(""), "printable name"),
        (t("a\nb"), "printable name"),
        (t("\ud800"), "printable name"),
        (t("é" * 513), "printable name"),  # 1026 bytes
    ],
)
def test_bad_tensors_are_refused_by_position(tensor: CatalogueTensor, words: str) -> None:
    err = refused([g("pre", t("ok")), g("layers.0", t("fine", at=256), tensor)])
    assert err.reason == "INVALID_CATALOGUE"
    assert words in err.message
    assert "tensor 1 of group 1 ('layers.0')" in err.message
    assert (err.metadata["group"], err.metadata["tensor"]) == ("layers.0", "1")


def test_a_negative_offset_is_called_negative() -> None:
    err = refused([g("pre", t("w", at=-256))])
    assert "tensor 0 of group 0" in err.message
    assert "negative" in err.message
    assert "not a multiple" not in err.message  # (-256 is one)


def test_a_rank_17_shape_is_refused_but_16_is_not() -> None:
    plan_image(FP, [g("pre", t("w", "U8", (1,) * 16))])
    refused([g("pre", t("w", "U8", (1,) * 17))])


def test_long_names_are_clipped_in_what_is_said() -> None:
    err = refused([g("pre", t(LONG[:1000], "Q8" * 500 + "TAIL"))])
    assert "unknown dtype" in err.message
    err = refused([g("pre", t(LONG), t(LONG, at=256))])
    # (LONG is over MAX_TENSOR_NAME bytes: refused for its length, not quoted)
    assert "printable name of 1 to 1024 bytes" in err.message
    name = "x" * 1000
    err = refused([g("pre", t(name)), g("post", t(name))])
    assert "named twice" in err.message and "tensor 0 of group 1" in err.message
    assert name not in err.message and name[:128] in err.message


def test_overlapping_spans_are_refused() -> None:
    err = refused([g("pre", t("a", "F32", (100,), 0), t("b", "U8", (1,), 256))])
    assert "group 0 ('pre')" in err.message and "overlap" in err.message
    assert "'a'" in err.message and "'b'" in err.message
    # Touching is not overlapping.
    plan_image(FP, [g("pre", t("a", "F32", (64,), 0), t("b", "U8", (1,), 256))])
    # Two at the same offset, the second anywhere in the list.
    refused([g("pre", t("a", "U8", (1,), 512), t("z", "U8", (300,), 0), t("b", "U8", (1,), 512))])


def test_tensor_names_are_unique_across_groups() -> None:
    err = refused([g("pre", t("w")), g("post", t("w"))])
    assert "tensor 0 of group 1 ('post')" in err.message and "named twice" in err.message


def test_group_names_are_unique() -> None:
    err = refused([g("pre", t("a")), g("pre", t("b"))])
    assert "group 1 ('pre') is named twice" in err.message


@pytest.mark.parametrize(
    "name",
    ["", "a/b", "x" * 129, ".hidden", "-dash", "a b", "é", "a\x00", "..", "layers/0", "\ud800"],
)
def test_bad_group_names_are_refused_unquoted(name: str) -> None:
    err = refused([g("pre", t("a")), g(name, t("b"))])
    assert "group 1's name must be 1 to 128 characters" in err.message
    assert err.metadata == {"group": "1"}
    if name:
        assert repr(name) not in err.message


def test_128_character_group_names_are_fine() -> None:
    plan_image(FP, [g("x" * 128, t("a"))])


def test_empty_groups_and_bad_sizes() -> None:
    err = refused([g("pre", t("a")), g("post")])
    assert "group 1 ('post') has 0 tensors" in err.message
    for size in (0, -1, MAX_GROUP_BYTES + 1):
        err = refused([g("pre", t("a", "U8", (0,)), size=size)])
        assert f"group 0 ('pre') has size {size}" in err.message
    # A 1 TiB slab is a valid catalogue (the budget refuses it later).
    plan_image(FP, [g("pre", t("a"), size=MAX_GROUP_BYTES)])


def test_group_counts() -> None:
    err = refused([])
    assert "1 to 4096 groups, not 0" in err.message
    many = [g(f"g{i}", t(f"t{i}", "U8", (0,))) for i in range(MAX_LAYERS + 1)]
    err = refused(many)
    assert f"not {MAX_LAYERS + 1}" in err.message
    plan_image(FP, many[:MAX_LAYERS])


def test_too_many_tensors() -> None:
    def tensors(prefix: str, n: int) -> tuple[CatalogueTensor, ...]:
        return tuple(t(f"{prefix}{i}", "U8", (0,)) for i in range(n))

    err = refused([CatalogueGroup("pre", 1, tensors("a", MAX_GROUP_TENSORS + 1))])
    assert "group 0 ('pre') has 65537 tensors" in err.message
    # Per image: the group that passes MAX_TENSORS is named.
    full = MAX_TENSORS // MAX_GROUP_TENSORS
    groups = [CatalogueGroup(f"g{i}", 1, tensors(f"g{i}.", MAX_GROUP_TENSORS)) for i in range(full)]
    groups.append(CatalogueGroup("last", 1, tensors("x", 1)))
    err = refused(groups)
    assert f"group {full} ('last') has 1 tensors" in err.message
    assert f"an image at most {MAX_TENSORS}" in err.message


@pytest.mark.parametrize(
    "fingerprint",
    [
        "",
        "f" * (MAX_FINGERPRINT + 1),
        "é" * (MAX_FINGERPRINT // 2 + 1),  # few enough characters, too many bytes
        "a\nb",
        "\x00",
        "tab\there",
        "del\x7f",
        "\x1b[31mred",
        "\ud800",
        "ok\udfffok",
        "\u2028",
    ],
)
def test_bad_fingerprints(fingerprint: str) -> None:
    err = refused([g("pre", t("a"))], fingerprint)
    assert err.reason == "INVALID_FINGERPRINT"
    assert fingerprint not in err.message or not fingerprint


def test_fingerprint_limits_are_bytes() -> None:
    plan_image("f" * MAX_FINGERPRINT, [g("pre", t("a"))])
    plan_image("é" * (MAX_FINGERPRINT // 2), [g("pre", t("a"))])
    plan_image("vllm 0.32 / model x / tp=2:1 / ü", [g("pre", t("a"))])
