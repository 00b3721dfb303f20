"""Errors about a checkpoint never echo what its files hold.

Each case plants a secret where a careless message would quote it (a tensor
name, a dtype, a key, a shard name, JSON text, a shape) and checks that the
error names the file, an entry's ordinal and offsets, and nothing else.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from torpor.testing import make_checkpoint, write_safetensors
from torpord.errors import TorporError
from torpord.storage import open_checkpoint
from torpord.storage.safetensors import INDEX_FILE

SECRET = "db_password=hunter2"
NUMBER = 987654321  # a secret a shape could carry


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD = entry("U8", [4], 0, 4)

# name: (header as JSON text, data)
HEADERS: dict[str, tuple[str, bytes]] = {
    "bad-dtype-name": (json.dumps({SECRET: entry("Q8", [4], 0, 4)}), b"\0" * 4),
    "dtype-is-secret": (json.dumps({"w": entry(SECRET, [4], 0, 4)}), b"\0" * 4),
    "extra-key": (json.dumps({"w": {**GOOD, SECRET: 1}}), b"\0" * 4),
    "extra-key-value": (json.dumps({"w": {**GOOD, "note": SECRET}}), b"\0" * 4),
    "size-mismatch": (json.dumps({SECRET: entry("U8", [NUMBER], 0, 4)}), b"\0" * 4),
    "shape-not-ints": (json.dumps({"w": entry("U8", [SECRET], 0, 4)}), b"\0" * 4),
    "offsets-not-ints": (
        json.dumps({"w": {"dtype": "U8", "shape": [4], "data_offsets": [SECRET, 4]}}),
        b"\0" * 4,
    ),
    "overlap": (
        json.dumps({SECRET: GOOD, "b" + SECRET: entry("U8", [4], 2, 6)}),
        b"\0" * 6,
    ),
    "hole": (json.dumps({SECRET: entry("U8", [4], 2, 6)}), b"\0" * 6),
    "past-the-end": (json.dumps({SECRET: entry("U8", [8], 0, 8)}), b"\0" * 4),
    "numel-overflow": (json.dumps({SECRET: entry("U8", [2**40, 2**40], 0, 4)}), b"\0" * 4),
    "empty-name-after-secret": (json.dumps({SECRET: GOOD, "": GOOD}), b"\0" * 4),
    "duplicate-key": (f'{{"{SECRET}": {json.dumps(GOOD)}, "{SECRET}": 1}}', b"\0" * 4),
    "json-error-after": (f'{{"{SECRET}": {{"dtype" "U8"}}}}', b""),
    "truncated-json": (f'{{"{SECRET}": {{"dtype": "{SECRET}', b""),
    "nan": (f'{{"{SECRET}": NaN}}', b""),
    "too-deep": (f'{{"{SECRET}": [[[[[["{SECRET}"]]]]]]}}', b""),
    "not-an-entry": (json.dumps({SECRET: [SECRET]}), b""),
    "metadata-not-strings": (json.dumps({"__metadata__": {SECRET: 1}}), b""),
    "surrogate-name": ('{"' + SECRET + '\\ud800": ' + json.dumps(GOOD) + "}", b"\0" * 4),
    "surrogate-metadata": ('{"__metadata__": {"' + SECRET + '": "\\udfff"}}', b""),
    "minus-zero": (json.dumps({SECRET: GOOD}).replace("[0, 4]", "[-0, 4]"), b"\0" * 4),
}


def no_secret(err: TorporError) -> None:
    for text in (err.message, *err.metadata.keys(), *err.metadata.values()):
        assert SECRET not in text and "hunter2" not in text, text
        assert str(NUMBER) not in text, text


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_header_errors_quote_nothing(tmp_path: Path, case: str) -> None:
    header, data = HEADERS[case]
    body = header.encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    with pytest.raises(TorporError) as info:
        open_checkpoint(path)
    assert info.value.reason == "INVALID_CHECKPOINT", info.value
    assert info.value.metadata["file"] == str(path)
    no_secret(info.value)


def sharded(root: Path) -> Path:
    """Two shards with one tensor each, and their index."""
    root.mkdir()
    write_safetensors(root / "a.safetensors", {"x": ("U8", [2], b"ab")})
    write_safetensors(root / "b.safetensors", {SECRET: ("U8", [1], b"c")})
    index = {"metadata": {}, "weight_map": {"x": "a.safetensors", SECRET: "b.safetensors"}}
    (root / INDEX_FILE).write_text(json.dumps(index))
    return root


def edit(root: Path, change: Any) -> None:
    doc = json.loads((root / INDEX_FILE).read_text())
    change(doc["weight_map"])
    (root / INDEX_FILE).write_text(json.dumps(doc))


INDEXES: dict[str, Any] = {
    "missing-shard-name": lambda m: m.__setitem__("y", SECRET + ".safetensors"),
    "missing-shard-key": lambda m: m.__setitem__(SECRET + "2", "gone.safetensors"),
    "traversal": lambda m: m.__setitem__("y", "../" + SECRET),
    "not-a-name": lambda m: m.__setitem__(SECRET + "3", 7),
    "empty-name": lambda m: m.__setitem__("", SECRET),
    "listed-not-held": lambda m: m.__setitem__(SECRET + "4", "a.safetensors"),
    "held-not-listed": lambda m: (m.pop(SECRET), m.__setitem__("x2", "b.safetensors")),
    "mapped-elsewhere": lambda m: m.__setitem__(SECRET, "a.safetensors"),
}


@pytest.mark.parametrize("case", sorted(INDEXES))
def test_index_errors_quote_nothing(tmp_path: Path, case: str) -> None:
    root = sharded(tmp_path / "m")
    edit(root, INDEXES[case])
    with pytest.raises(TorporError) as info:
        open_checkpoint(root)
    assert info.value.reason == "INVALID_CHECKPOINT", info.value
    no_secret(info.value)


@pytest.mark.parametrize(
    "text",
    [
        f'{{"weight_map": {{"{SECRET}" "a.safetensors"}}}}',
        f'{{"weight_map": {{"{SECRET}": "a", "{SECRET}": "b"}}}}',
        f'{{"weight_map": {{"x": "{SECRET}\\ud800"}}}}',
        f'{{"metadata": {{"note": "{SECRET}\\udfff"}}, "weight_map": {{"x": "a.safetensors"}}}}',
        f'{{"weight_map": {{"x": {"[" * 1000}"{SECRET}"{"]" * 1000}}}}}',
        f'{{"{SECRET}": 1}}',
        f'["{SECRET}"]',
    ],
    ids=["syntax", "duplicate", "surrogate-value", "surrogate-metadata", "deep", "no-map", "list"],
)
def test_bad_index_json_quotes_nothing(tmp_path: Path, text: str) -> None:
    root = sharded(tmp_path / "m")
    (root / INDEX_FILE).write_text(text)
    with pytest.raises(TorporError) as info:
        open_checkpoint(root)
    assert info.value.reason == "INVALID_CHECKPOINT", info.value
    assert info.value.metadata["file"] == str(root / INDEX_FILE)
    no_secret(info.value)


def test_a_tensor_in_two_shards_quotes_nothing(tmp_path: Path) -> None:
    root = sharded(tmp_path / "m")
    write_safetensors(root / "a.safetensors", {"x": ("U8", [2], b"ab"), SECRET: ("U8", [1], b"c")})
    with pytest.raises(TorporError) as info:
        open_checkpoint(root)
    assert "holds too" in info.value.message
    no_secret(info.value)


def test_a_valid_checkpoint_shows_its_names(tmp_path: Path) -> None:
    # Once a checkpoint validated, its tensor names are the model's public metadata.
    ckpt = open_checkpoint(sharded(tmp_path / "m"))
    assert {t.name for t in ckpt.tensors} == {"x", SECRET}
    assert make_checkpoint(tmp_path / "ok", layers=1).exists()
