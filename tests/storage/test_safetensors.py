"""Strict safetensors parsing, reads and change detection (torpord.storage.safetensors)."""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from torpor.testing import make_checkpoint, write_safetensors
from torpord.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from torpord.storage import DTYPES, Checkpoint, check_unchanged, open_checkpoint, read_tensors
from torpord.storage.fileio import Buffer, SystemIO
from torpord.storage.safetensors import INDEX_FILE
from torpord.storage.sources import ordinal

NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "U16": np.uint16,
    "F16": np.float16,
    "I32": np.int32,
    "U32": np.uint32,
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "U64": np.uint64,
}


def raw_file(path: Path, header: bytes | dict[str, Any], data: bytes = b"") -> Path:
    """Write a file with an arbitrary header (bytes as given, dicts as JSON)."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def invalid(path: Path, **kwargs: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        open_checkpoint(path, **kwargs)
    err = info.value
    assert err.reason == "INVALID_CHECKPOINT"
    assert str(path) in err.message
    assert "file" in err.metadata
    return err


def all_bytes(ckpt: Checkpoint) -> dict[str, bytes]:
    dest = bytearray(ckpt.data_bytes)
    items, at = [], 0
    for t in ckpt.tensors:
        items.append((t, at))
        at += t.nbytes
    assert read_tensors(ckpt, items, memoryview(dest)) == ckpt.data_bytes
    return {t.name: bytes(dest[a : a + t.nbytes]) for t, a in items}


# --- valid files ---------------------------------------------------------------


def test_parses_single_file(tmp_path: Path) -> None:
    path = write_safetensors(
        tmp_path / "m.safetensors",
        {
            "b": ("F32", [2, 3], bytes(range(24))),
            "a": ("U8", [4], b"wxyz"),
            "empty": ("F16", [0, 5], b""),
        },
        {"format": "pt"},
    )
    ckpt = open_checkpoint(path)
    assert ckpt.path == str(path.resolve())
    assert dict(ckpt.metadata) == {"format": "pt"}
    assert ckpt.data_bytes == 28
    (src,) = ckpt.files
    st = os.stat(path)
    assert (src.path, src.size, src.mtime_ns, src.inode, src.device) == (
        str(path.resolve()),
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
        st.st_dev,
    )
    assert len(src.header_hash) == 16
    n = int.from_bytes(path.read_bytes()[:8], "little")
    offsets = [t.file_offset for t in ckpt.tensors]
    assert offsets == sorted(offsets)
    by_name = {t.name: t for t in ckpt.tensors}
    assert by_name["b"].shape == (2, 3) and by_name["b"].dtype == "F32"
    assert by_name["b"].file_offset == 8 + n and by_name["b"].nbytes == 24
    assert by_name["empty"].nbytes == 0 and by_name["a"].nbytes == 4
    assert all_bytes(ckpt) == {"b": bytes(range(24)), "a": b"wxyz", "empty": b""}


def test_matches_reference_writer(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray[Any, Any]] = {
        f"t.{code}": (rng.random((3, 5)) * 100).astype(dt) for code, dt in NUMPY_DTYPES.items()
    }
    arrays["scalar"] = np.array(1.5, dtype=np.float32)
    path = tmp_path / "ref.safetensors"
    save_file(arrays, str(path), metadata={"k": "v"})
    ckpt = open_checkpoint(path)
    assert dict(ckpt.metadata) == {"k": "v"}
    with safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(t.name for t in ckpt.tensors)
        for t in ckpt.tensors:
            sl = f.get_slice(t.name)
            assert t.shape == tuple(sl.get_shape())
            assert t.dtype == sl.get_dtype()
    data = all_bytes(ckpt)
    for name, array in arrays.items():
        assert data[name] == array.tobytes()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_every_dtype_is_accepted_here_and_by_the_reference(tmp_path: Path, dtype: str) -> None:
    data = bytes(range(DTYPES[dtype] * 8 // 8))
    path = write_safetensors(tmp_path / "d.safetensors", {"x": (dtype, [8], data)})
    (t,) = open_checkpoint(path).tensors
    assert (t.dtype, t.shape, t.nbytes) == (dtype, (8,), len(data))
    with safe_open(str(path), framework="numpy") as f:  # the reference agrees on the size
        assert f.get_slice("x").get_dtype() == dtype


def test_sub_byte_dtype_must_end_on_a_byte(tmp_path: Path) -> None:
    ok = raw_file(tmp_path / "ok.safetensors", {"x": entry("F4", [2, 3], 0, 3)}, b"\0" * 3)
    assert open_checkpoint(ok).tensors[0].nbytes == 3
    # Like the reference crate (MisalignedSlice): 3 x 4 bits is not whole bytes.
    bad = raw_file(tmp_path / "bad.safetensors", {"x": entry("F4", [3], 0, 2)}, b"\0" * 2)
    err = invalid(bad)
    assert "1st entry" in err.message and "whole number of bytes" in err.message
    assert err.metadata["entry"] == "1"


def test_zero_byte_tensors_anywhere_on_the_path(tmp_path: Path) -> None:
    header = {
        "a": entry("U8", [2], 0, 2),
        "z": entry("U8", [0], 2, 2),
        "b": entry("U8", [2], 2, 4),
        "start": entry("I32", [0, 3], 0, 0),
    }
    path = raw_file(tmp_path / "z.safetensors", header, b"abcd")
    names = [t.name for t in open_checkpoint(path).tensors]
    assert names == ["start", "a", "z", "b"]


def test_header_only_file_has_no_tensors(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "e.safetensors", b"{}      ")
    ckpt = open_checkpoint(path)
    assert ckpt.tensors == () and ckpt.data_bytes == 0


# --- malformed files -------------------------------------------------------------


def test_file_shorter_than_8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\0\0")
    assert "3 bytes, too short for a safetensors file" in invalid(path).message


def test_header_length_zero(tmp_path: Path) -> None:
    err = invalid(raw_file(tmp_path / "z.safetensors", b""))
    assert err.metadata["offset"] == "0" and "offset 0" in err.message


def test_header_length_past_end(tmp_path: Path) -> None:
    path = tmp_path / "past.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    err = invalid(path)
    assert "past the end" in err.message and err.metadata["offset"] == "0"


def test_huge_header(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "h.safetensors", {"x": entry("U8", [1], 0, 1)}, b"\0")
    err = invalid(path, max_header_bytes=16)
    assert "huge header" in err.message and "offset 0" in err.message
    huge = tmp_path / "h2.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    assert "huge header" in invalid(huge).message


def test_header_not_utf8(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "u.safetensors", b'{"\xff": 1}')
    err = invalid(path)
    assert "UTF-8" in err.message and err.metadata["offset"] == "10"


@pytest.mark.parametrize(
    ("body", "words", "offset"),
    [
        (b'{"x": ', "not valid JSON at byte 6", 14),
        (b'{"x": NaN}', "NaN", 8),
        (b'{"a": {}, "a": {}}', "same key twice", 8),
        (b'{"a": {"shape": ' + b"[" * 100_000, "nested deeper than 3 levels (at byte 17)", 25),
    ],
    ids=["truncated", "nan", "duplicate-key", "deep-nesting"],
)
def test_header_not_json(tmp_path: Path, body: bytes, words: str, offset: int) -> None:
    err = invalid(raw_file(tmp_path / "j.safetensors", body))
    assert words in err.message and err.metadata["offset"] == str(offset)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b" {}", b"[" * 100_000])
def test_a_header_not_starting_with_a_brace_is_not_safetensors(tmp_path: Path, body: bytes) -> None:
    # Like the crate's InvalidHeaderStart: not a malformed header, another format.
    err = invalid(raw_file(tmp_path / "l.safetensors", body))
    assert "not a safetensors file" in err.message and err.metadata["offset"] == "8"


def test_a_text_file_renamed_safetensors_is_not_a_safetensors_file(tmp_path: Path) -> None:
    text = b"Some notes about the model, nothing like safetensors at all.\n" * 4
    path = tmp_path / "notes.safetensors"
    path.write_bytes(text)
    err = invalid(path)
    assert "not a safetensors file" in err.message
    assert "huge" not in err.message and "notes about" not in err.message
    assert str(int.from_bytes(text[:8], "little")) not in err.message


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([1, 2], "is not an object"),
        ({"dtype": "U8", "shape": [1]}, "lacks data_offsets"),
        ({**entry("U8", [1], 0, 1), "extra": 1}, "has 1 key besides dtype, shape and data_offsets"),
        (entry("Q8", [1], 0, 1), "has a dtype that safetensors does not know"),
        (entry("U8", [-1], 0, 1), "shape"),
        (entry("U8", [True], 0, 1), "shape"),
        ({"dtype": "U8", "shape": 1, "data_offsets": [0, 1]}, "shape"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [0]}, "data_offsets"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [0, 1.0]}, "data_offsets"),
        (entry("U8", [0], 1, 0), "end before they begin"),
        (entry("F32", [2], 0, 1), "data_offsets [0, 1] that span 1 bytes, not the size"),
        (entry("U8", [4], 0, 4), "run past the data area"),
        (entry("U8", [2**32, 2**32, 2], 0, 1), "more than 2**64 elements"),
        (entry("U8", [2**64], 0, 1), "shape"),
    ],
    ids=[
        "entry-not-object",
        "missing-key",
        "extra-key",
        "unknown-dtype",
        "negative-dim",
        "bool-dim",
        "shape-not-list",
        "one-offset",
        "float-offset",
        "begin-after-end",
        "shape-span-mismatch",
        "out-of-bounds",
        "numel-overflow",
        "dim-overflow",
    ],
)
def test_bad_entry(tmp_path: Path, value: Any, words: str) -> None:
    path = raw_file(tmp_path / "e.safetensors", {"__metadata__": {}, "w.0": value}, b"\0")
    err = invalid(path)
    assert words in err.message
    # Named by its place in the header, never by what the file says.
    assert "the 2nd entry of the header" in err.message and err.metadata["entry"] == "2"
    assert "w.0" not in err.message and "w.0" not in err.metadata.values()


def test_overlapping_spans(tmp_path: Path) -> None:
    header = {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}
    err = invalid(raw_file(tmp_path / "o.safetensors", header, b"\0" * 6))
    assert "the 2nd entry of the header has data_offsets [2, 6]" in err.message
    assert "overlap those of the 1st entry (which end at 4)" in err.message
    n = len(json.dumps(header))
    assert err.metadata["offset"] == str(8 + n + 2)


def test_hole_between_spans(tmp_path: Path) -> None:
    header = {"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 4, 6)}
    err = invalid(raw_file(tmp_path / "h.safetensors", header, b"\0" * 6))
    assert "2nd entry" in err.message and "hole of 2 bytes at data offset 2" in err.message


def test_first_span_must_start_at_zero(tmp_path: Path) -> None:
    header = {"a": entry("U8", [2], 2, 4)}
    err = invalid(raw_file(tmp_path / "s.safetensors", header, b"\0" * 4))
    assert "1st entry" in err.message and "data offset 0" in err.message


def test_trailing_bytes_after_last_tensor(tmp_path: Path) -> None:
    header = {"a": entry("U8", [2], 0, 2)}
    err = invalid(raw_file(tmp_path / "t.safetensors", header, b"\0" * 5))
    n = len(json.dumps(header))
    assert "3 bytes after the last tensor" in err.message
    assert err.metadata["offset"] == str(8 + n + 2) and f"offset {8 + n + 2}" in err.message


def test_metadata_must_map_strings_to_strings(tmp_path: Path) -> None:
    header = {"__metadata__": {"n": 1}, "a": entry("U8", [1], 0, 1)}
    assert "__metadata__" in invalid(raw_file(tmp_path / "m.safetensors", header, b"\0")).message


def test_empty_tensor_name(tmp_path: Path) -> None:
    err = invalid(raw_file(tmp_path / "n.safetensors", {"": entry("U8", [1], 0, 1)}, b"\0"))
    assert "1st entry of the header has an empty tensor name" in err.message


# --- sources: paths, directories, shards -------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as info:
        open_checkpoint(tmp_path / "nope.safetensors")
    assert info.value.reason == "SOURCE_NOT_FOUND" and "nope.safetensors" in info.value.message


def test_unsupported_sources(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    (tmp_path / "emptydir").mkdir()
    for path in (tmp_path / "model.bin", tmp_path / "emptydir"):
        with pytest.raises(InvalidArgument) as info:
            open_checkpoint(path)
        assert info.value.reason == "UNSUPPORTED_SOURCE" and str(path) in info.value.message


def test_directory_with_model_safetensors(tmp_path: Path) -> None:
    out = make_checkpoint(tmp_path / "m", layers=2)
    ckpt = open_checkpoint(out)
    assert ckpt.path == str(out.resolve())
    assert [f.path for f in ckpt.files] == [str(out.resolve() / "model.safetensors")]


def test_symlinked_file_resolves(tmp_path: Path) -> None:
    target = make_checkpoint(tmp_path / "blob.safetensors", layers=1)
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    assert open_checkpoint(link).path == str(target.resolve())


def test_sharded_directory(tmp_path: Path) -> None:
    single = open_checkpoint(make_checkpoint(tmp_path / "one", layers=3, seed=7))
    sharded = open_checkpoint(make_checkpoint(tmp_path / "three", layers=3, shards=3, seed=7))
    assert [Path(f.path).name for f in sharded.files] == [
        f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)
    ]
    keys = [(t.file_index, t.file_offset) for t in sharded.tensors]
    assert keys == sorted(keys) and {t.file_index for t in sharded.tensors} == {0, 1, 2}
    assert dict(sharded.metadata) == {"format": "pt"}
    assert sharded.data_bytes == single.data_bytes
    assert all_bytes(sharded) == all_bytes(single)


def edit_index(root: Path, change: Any) -> None:
    path = root / "model.safetensors.index.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def sharded_invalid(root: Path) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        open_checkpoint(root)
    assert info.value.reason == "INVALID_CHECKPOINT"
    return info.value


@pytest.mark.parametrize("shard", ["../evil.safetensors", "sub/x.safetensors", "..", "/etc/x"])
def test_shard_path_traversal(tmp_path: Path, shard: str) -> None:
    root = make_checkpoint(tmp_path / "m", layers=2, shards=2)
    edit_index(root, lambda d: d["weight_map"].__setitem__("lm_head.weight", shard))
    err = sharded_invalid(root)
    assert "does not name a plain file" in err.message and "lm_head" not in err.message
    number = list(json.loads((root / "model.safetensors.index.json").read_text())["weight_map"])
    assert f"weight_map's {number.index('lm_head.weight') + 1}" in err.message


def test_shard_missing(tmp_path: Path) -> None:
    root = make_checkpoint(tmp_path / "m", layers=2, shards=2)
    (root / "model-00002-of-00002.safetensors").unlink()
    err = sharded_invalid(root)
    weight_map = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    first = list(weight_map.values()).index("model-00002-of-00002.safetensors") + 1
    assert err.message.endswith(f"weight_map's {ordinal(first)} entry names a file that is missing")
    assert "model-00002" not in err.message and err.metadata["entry"] == str(first)


def test_index_lists_tensor_missing_from_shard(tmp_path: Path) -> None:
    root = make_checkpoint(tmp_path / "m", layers=2, shards=2)
    edit_index(
        root, lambda d: d["weight_map"].__setitem__("ghost", "model-00001-of-00002.safetensors")
    )
    err = sharded_invalid(root)
    assert "ghost" not in err.message and "model-00001-of-00002" in err.message
    assert "names a tensor that this file does not hold" in err.message


def test_shard_tensor_not_in_index(tmp_path: Path) -> None:
    root = make_checkpoint(tmp_path / "m", layers=2, shards=2)
    edit_index(root, lambda d: d["weight_map"].pop("lm_head.weight"))
    err = sharded_invalid(root)
    assert f"{INDEX_FILE} does not list" in err.message and "offset" in err.metadata
    assert "lm_head" not in err.message


def test_tensor_in_two_shards(tmp_path: Path) -> None:
    root = tmp_path / "dup"
    root.mkdir()
    write_safetensors(root / "a.safetensors", {"x": ("U8", [2], b"ab"), "y": ("U8", [1], b"c")})
    write_safetensors(root / "b.safetensors", {"x": ("U8", [2], b"ab")})
    index = {"weight_map": {"x": "b.safetensors", "y": "a.safetensors"}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    err = sharded_invalid(root)
    assert err.message == (
        f"{root / 'b.safetensors'}: the 1st entry of its header holds a tensor that"
        f" {root / 'a.safetensors'} holds too (its 1st entry)"
    )


@pytest.mark.parametrize(
    "text", ["{not json", "[]", '{"weight_map": {}}', '{"weight_map": {"x": 3}}', '{"a": 1}']
)
def test_bad_index(tmp_path: Path, text: str) -> None:
    root = make_checkpoint(tmp_path / "m", layers=1, shards=2)
    (root / "model.safetensors.index.json").write_text(text)
    err = sharded_invalid(root)
    assert "model.safetensors.index.json" in err.message


def test_bad_shard_names_the_shard(tmp_path: Path) -> None:
    root = make_checkpoint(tmp_path / "m", layers=1, shards=2)
    (root / "model-00002-of-00002.safetensors").write_bytes(b"\1\0\0\0\0\0\0\0[")
    assert "model-00002-of-00002.safetensors" in sharded_invalid(root).message


# --- reading -------------------------------------------------------------------------


def test_read_tensors_at_chosen_offsets(tmp_path: Path) -> None:
    tensors = {"a": ("U8", [3], b"abc"), "b": ("I16", [2], b"wxyz"), "z": ("F32", [0], b"")}
    ckpt = open_checkpoint(write_safetensors(tmp_path / "r.safetensors", tensors))
    by_name = {t.name: t for t in ckpt.tensors}
    dest = bytearray(b"." * 32)
    n = read_tensors(
        ckpt, [(by_name["b"], 0), (by_name["a"], 10), (by_name["z"], 32)], memoryview(dest)
    )
    assert n == 7
    assert bytes(dest) == b"wxyz" + b"." * 6 + b"abc" + b"." * 19


def test_read_rejects_destination_overflow(tmp_path: Path) -> None:
    ckpt = open_checkpoint(
        write_safetensors(tmp_path / "r.safetensors", {"a": ("U8", [3], b"abc")})
    )
    with pytest.raises(ValueError, match="'a'"):
        read_tensors(ckpt, [(ckpt.tensors[0], 1)], memoryview(bytearray(3)))


def test_truncated_after_open_is_source_changed(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m.safetensors", layers=1)
    ckpt = open_checkpoint(path)
    os.truncate(path, ckpt.files[0].size - 10)
    last = ckpt.tensors[-1]
    with pytest.raises(FailedPrecondition) as info:
        read_tensors(ckpt, [(last, 0)], memoryview(bytearray(last.nbytes)))
    assert info.value.reason == "SOURCE_CHANGED"
    assert str(path.resolve()) in info.value.message and "offset" in info.value.message


class HalfThenEnd(SystemIO):
    """A file that gives half of the first read asked, then ends (it shrank
    under the reader); each read's offset noted."""

    def __init__(self) -> None:
        self.offsets: list[int] = []

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
        self.offsets.append(offset)
        if len(self.offsets) > 1:
            return 0  # the file "ended" under us
        half = memoryview(buffers[0])[: len(buffers[0]) // 2]
        return super().preadv(fd, [half], offset, flags)


def test_short_read_is_source_changed(tmp_path: Path) -> None:
    ckpt = open_checkpoint(make_checkpoint(tmp_path / "m.safetensors", layers=1))
    t = ckpt.tensors[1]
    io = HalfThenEnd()
    with pytest.raises(FailedPrecondition) as info:
        read_tensors(ckpt, [(t, 0)], memoryview(bytearray(t.nbytes)), io=io)
    err = info.value
    assert err.reason == "SOURCE_CHANGED"
    assert io.offsets == [t.file_offset, t.file_offset + t.nbytes // 2]
    assert f"offset {t.file_offset + t.nbytes // 2}" in err.message and t.name in err.message


class FailingDisk(SystemIO):
    """A disk whose every read fails."""

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))


def test_read_error_is_unavailable(tmp_path: Path) -> None:
    ckpt = open_checkpoint(make_checkpoint(tmp_path / "m.safetensors", layers=1))
    t = ckpt.tensors[0]
    with pytest.raises(Unavailable) as info:
        read_tensors(ckpt, [(t, 0)], memoryview(bytearray(t.nbytes)), io=FailingDisk())
    err = info.value
    assert err.reason == "SOURCE_READ_FAILED"
    assert os.strerror(errno.EIO) in err.message and f"offset {t.file_offset}" in err.message
    assert err.metadata["file"] == ckpt.files[0].path


# --- change detection --------------------------------------------------------------


@pytest.fixture
def opened(tmp_path: Path) -> tuple[Path, Checkpoint]:
    path = make_checkpoint(tmp_path / "m.safetensors", layers=1)
    return path, open_checkpoint(path)


def test_unchanged(opened: tuple[Path, Checkpoint]) -> None:
    assert check_unchanged(opened[1]) is None


def test_size_change(opened: tuple[Path, Checkpoint]) -> None:
    path, ckpt = opened
    with open(path, "ab") as f:
        f.write(b"\0")
    message = check_unchanged(ckpt)
    assert message is not None and str(path.resolve()) in message and "size" in message


def test_mtime_change(opened: tuple[Path, Checkpoint]) -> None:
    path, ckpt = opened
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    message = check_unchanged(ckpt)
    assert message is not None and "mtime" in message and str(path.resolve()) in message


def test_header_change_same_size_and_mtime(opened: tuple[Path, Checkpoint]) -> None:
    path, ckpt = opened
    st = path.stat()
    raw = bytearray(path.read_bytes())
    at = raw.index(b"lm_head")
    raw[at : at + 7] = b"LM_HEAD"
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(raw)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    message = check_unchanged(ckpt)
    assert message is not None and "header" in message and str(path.resolve()) in message


def test_deleted_file(opened: tuple[Path, Checkpoint]) -> None:
    path, ckpt = opened
    path.unlink()
    message = check_unchanged(ckpt)
    assert message is not None and "missing" in message and str(path.resolve()) in message


def test_replaced_file(opened: tuple[Path, Checkpoint], tmp_path: Path) -> None:
    path, ckpt = opened
    st = path.stat()
    copy = tmp_path / "copy"
    copy.write_bytes(path.read_bytes())
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(copy, path)
    message = check_unchanged(ckpt)
    assert message is not None and "inode" in message
    # Reads refuse a replaced file rather than trusting its offsets.
    t = ckpt.tensors[0]
    with pytest.raises(FailedPrecondition):
        read_tensors(ckpt, [(t, 0)], memoryview(bytearray(t.nbytes)))


# --- what the reference crate's parser refuses too ---------------------------------------


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (b'{"a\\ud800": ENTRY}', "1st entry of the header has a name with a lone UTF-16"),
        (b'{"__metadata__": {"k": "\\udfff"}, "a": ENTRY}', "__metadata__ holds a lone"),
        (b'{"__metadata__": {"\\ud800": "v"}, "a": ENTRY}', "__metadata__ holds a lone"),
    ],
)
def test_lone_surrogates_are_invalid(tmp_path: Path, header: bytes, words: str) -> None:
    # Such a name can't be a protobuf string: the model would break GetModel.
    body = header.replace(b"ENTRY", json.dumps(entry("U8", [1], 0, 1)).encode())
    assert words in invalid(raw_file(tmp_path / "s.safetensors", body, b"\0")).message


def test_surrogate_pairs_are_characters(tmp_path: Path) -> None:
    body = b'{"a\\ud83d\\ude00": ' + json.dumps(entry("U8", [1], 0, 1)).encode() + b"}"
    (t,) = open_checkpoint(raw_file(tmp_path / "s.safetensors", body, b"\0")).tensors
    assert t.name == "a\U0001f600"


@pytest.mark.parametrize(
    "first",
    [
        b'{"dtype": "U8", "shape": [-0], "data_offsets": [0, 0]}',
        b'{"dtype": "U8", "shape": [0], "data_offsets": [-0, 0]}',
    ],
    ids=["dimension", "offset"],
)
def test_minus_zero_is_invalid(tmp_path: Path, first: bytes) -> None:
    # The crate parses usize, which has no -0; Python's json reads it as 0.
    body = b'{"a": ' + first + b', "b": ' + json.dumps(entry("U8", [1], 0, 1)).encode() + b"}"
    err = invalid(raw_file(tmp_path / "z.safetensors", body, b"\0"))
    at = 8 + body.index(b"-0")
    assert f"negative number at offset {at}" in err.message and err.metadata["offset"] == str(at)


def test_minus_zero_in_a_string_is_a_name(tmp_path: Path) -> None:
    body = b'{"a-0": ' + json.dumps(entry("U8", [1], 0, 1)).encode() + b"}"
    (t,) = open_checkpoint(raw_file(tmp_path / "n.safetensors", body, b"\0")).tensors
    assert t.name == "a-0"


@pytest.mark.parametrize(
    "text",
    [
        '{"weight_map": {"x\\ud800": "model-00001-of-00002.safetensors"}}',
        '{"weight_map": {"x": "model-00001-of-00002\\udcff.safetensors"}}',
        '{"metadata": {"n": "\\ud800"}, "weight_map": {"x": "a.safetensors"}}',
    ],
)
def test_index_strings_must_be_unicode(tmp_path: Path, text: str) -> None:
    root = make_checkpoint(tmp_path / "m", layers=1, shards=2)
    (root / INDEX_FILE).write_text(text)
    assert "lone UTF-16 surrogate" in sharded_invalid(root).message


def test_a_deeply_nested_index_is_invalid_not_a_crash(tmp_path: Path) -> None:
    root = make_checkpoint(tmp_path / "m", layers=1, shards=2)
    (root / INDEX_FILE).write_text('{"weight_map": ' + "[" * 1000 + "]" * 1000 + "}")
    err = sharded_invalid(root)
    assert "nested deeper than" in err.message and err.metadata["offset"] == str(15 + 31)
