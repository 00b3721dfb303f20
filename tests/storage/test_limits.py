"""A checkpoint's documented limits: tensors, files, header bytes, metadata."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from torpor.testing import write_safetensors
from torpord.errors import InvalidArgument
from torpord.storage import open_checkpoint
from torpord.storage.safetensors import INDEX_FILE, MAX_METADATA_ENTRIES, MAX_SHARDS, MAX_TENSORS


def many(path: Path, count: int, metadata: dict[str, str] | None = None) -> Path:
    """`count` tensors: one of 4 bytes, the rest zero-byte (the cheapest a
    header can make many of)."""
    parts = ['"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}']
    parts += [f'"t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}' for i in range(count - 1)]
    if metadata is not None:
        parts.insert(0, '"__metadata__":' + json.dumps(metadata))
    body = ("{" + ",".join(parts) + "}").encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(4))
    return path


def too_large(path: Path, **kwargs: int) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        open_checkpoint(path, **kwargs)
    assert info.value.reason == "CHECKPOINT_TOO_LARGE", info.value
    return info.value


def test_tensors_per_file(tmp_path: Path) -> None:
    assert len(open_checkpoint(many(tmp_path / "ok.safetensors", 10), max_tensors=10).tensors) == 10
    err = too_large(many(tmp_path / "over.safetensors", 11), max_tensors=10)
    assert "more than 10 tensors" in err.message and err.metadata["limit"] == "10"


def test_braces_inside_strings_are_not_objects(tmp_path: Path) -> None:
    # The quick count sees thousands of `{`; the exact one sees the 10 tensors.
    path = many(tmp_path / "m.safetensors", 10, {"config": "{" * 5000, "more": '{\\"}' * 100})
    ckpt = open_checkpoint(path, max_tensors=10)
    assert len(ckpt.tensors) == 10 and ckpt.metadata["config"] == "{" * 5000


def test_the_default_limit_is_checked_before_parsing(tmp_path: Path) -> None:
    # The attack: a header within 100 MiB of many zero-byte tensors.
    err = too_large(many(tmp_path / "m.safetensors", MAX_TENSORS + 1))
    assert f"more than {MAX_TENSORS} tensors" in err.message


def two_shards(root: Path, per_shard: int) -> Path:
    root.mkdir()
    weight_map = {}
    for shard in ("a", "b"):
        names = {f"{shard}{i}": ("U8", [1], b"x") for i in range(per_shard)}
        write_safetensors(root / f"{shard}.safetensors", names)
        weight_map.update(dict.fromkeys(names, f"{shard}.safetensors"))
    (root / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    return root


def test_tensors_of_all_shards_together(tmp_path: Path) -> None:
    root = two_shards(tmp_path / "m", 6)
    assert len(open_checkpoint(root, max_tensors=12).tensors) == 12
    # Past the weight map: every shard's header counts, in order.
    index = json.dumps({"weight_map": {"a0": "a.safetensors", "b0": "b.safetensors"}})
    (root / INDEX_FILE).write_text(index)
    err = too_large(root, max_tensors=10)
    assert err.message.startswith(str(root / "b.safetensors"))


def test_weight_map_entries(tmp_path: Path) -> None:
    err = too_large(two_shards(tmp_path / "m", 6), max_tensors=11)
    assert "weight_map lists more than 11 tensors" in err.message


def test_header_bytes_of_all_shards_together(tmp_path: Path) -> None:
    root = two_shards(tmp_path / "m", 3)
    one = int.from_bytes((root / "a.safetensors").read_bytes()[:8], "little")
    assert len(open_checkpoint(root, max_header_bytes=4 * one).files) == 2
    err = too_large(root, max_header_bytes=one + 10)
    assert f"add up to more than {one + 10} bytes" in err.message


def test_files_per_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    weight_map = {f"t{i}": f"s{i}.safetensors" for i in range(MAX_SHARDS + 1)}
    (root / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    # Refused before a single shard is opened (none of them exists).
    assert f"more than {MAX_SHARDS} files" in too_large(root).message


def test_metadata_entries(tmp_path: Path) -> None:
    metadata = {f"k{i}": "" for i in range(MAX_METADATA_ENTRIES + 1)}
    err = too_large(many(tmp_path / "m.safetensors", 2, metadata))
    assert f"more than {MAX_METADATA_ENTRIES} entries" in err.message
    # Strings past what the limits allow are refused before parsing.
    metadata = {f"k{i}": "" for i in range(4 * MAX_METADATA_ENTRIES)}
    err = too_large(many(tmp_path / "m.safetensors", 2, metadata), max_tensors=2)
    assert "more strings than 2 tensors" in err.message
