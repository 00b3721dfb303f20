"""Strict safetensors parsing.

A safetensors file is an 8-byte little-endian header length N, N bytes of
UTF-8 JSON (tensor name -> {dtype, shape, data_offsets}, plus an optional
`__metadata__` string map), then the data area. Only headers are parsed here;
tensor bytes are read on demand by `torpord.storage.reader` (re-exported here
as `read_tensors` and `check_unchanged`).

Validation matches the reference Rust crate (`Metadata::validate` in
safetensors/src/tensor.rs) and is stricter in a few places, because a daemon
that copies bytes into slabs by offset must never trust a span it hasn't
checked:

- header length > 0, <= `max_header_bytes`, and within the file;
- the header is UTF-8 JSON (no NaN/Infinity, no duplicate keys) holding an
  object; every entry is an object with exactly `dtype`, `shape` and
  `data_offsets` (the crate ignores extra keys; we reject them);
- known dtype; shape a list of non-negative ints; `data_offsets` two ints
  with begin <= end; numel x bits a whole number of bytes equal to end-begin
  (sub-byte dtypes such as F4 must end on a byte boundary, as in the crate);
- sorted by offset, the spans tile the data area exactly: the first starts at
  0, each starts where the previous ended (no overlap, no hole) and the last
  ends at the end of the file (the crate's `InvalidOffset` and
  `MetadataIncompleteBuffer`); zero-byte tensors may sit anywhere on that path;
- `__metadata__` is an object of string -> string; tensor names are non-empty.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NoReturn

import xxhash

from torpord.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TorporError,
    Unavailable,
)

__all__ = [
    "DTYPES",
    "INDEX_FILE",
    "SINGLE_FILE",
    "Checkpoint",
    "SourceFile",
    "TensorInfo",
    "check_unchanged",
    "open_checkpoint",
    "read_tensors",
]

#: Item size in bits of every dtype safetensors 0.8 knows.
DTYPES: Mapping[str, int] = MappingProxyType(
    {
        "BOOL": 8,
        "U8": 8,
        "I8": 8,
        "F8_E5M2": 8,
        "F8_E4M3": 8,
        "F8_E8M0": 8,
        "F8_E4M3FNUZ": 8,
        "F8_E5M2FNUZ": 8,
        "F4": 4,
        "F6_E2M3": 6,
        "F6_E3M2": 6,
        "I16": 16,
        "U16": 16,
        "F16": 16,
        "BF16": 16,
        "I32": 32,
        "U32": 32,
        "F32": 32,
        "F64": 64,
        "I64": 64,
        "U64": 64,
        "C64": 64,
    }
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_INVALID = "INVALID_CHECKPOINT"
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
# The crate parses dims and offsets as usize; anything larger is corrupt.
_MAX_INT = 2**64 - 1


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor's bytes live."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file_index: int
    file_offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file of a checkpoint, with what identifies its contents at open time."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    device: int
    header_hash: str  # xxh3_64 hex of the first 8 + N bytes


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A parsed checkpoint: its files and every tensor in them."""

    path: str  # resolved absolute path given
    files: tuple[SourceFile, ...]
    tensors: tuple[TensorInfo, ...]  # ordered by (file_index, file_offset)
    # __metadata__ of the first file; left out of the hash (a mapping proxy has
    # none) so checkpoints can still be set members and dict keys.
    metadata: Mapping[str, str] = field(hash=False)

    @property
    def data_bytes(self) -> int:
        """Total tensor bytes (headers excluded)."""
        return sum(t.nbytes for t in self.tensors)


def _invalid(path: str, message: str, **metadata: object) -> NoReturn:
    raise InvalidArgument(
        f"{path}: {message}", reason=_INVALID, metadata={"file": path, **metadata}
    )


def _os_error(path: str, err: OSError, offset: int | None = None) -> TorporError:
    where = "" if offset is None else f" at offset {offset}"
    meta: dict[str, object] = {"file": path}
    if offset is not None:
        meta["offset"] = offset
    text = err.strerror or str(err)
    if isinstance(err, FileNotFoundError):
        return NotFound(f"{path}: no such file", reason="SOURCE_NOT_FOUND", metadata=meta)
    if isinstance(err, PermissionError):
        return PermissionDenied(f"{path}: {text}", reason="SOURCE_PERMISSION_DENIED", metadata=meta)
    if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EISDIR, errno.EINVAL):
        # A path that can't name a file: the caller's mistake, not a flaky disk.
        return InvalidArgument(f"{path}: {text}", reason="INVALID_SOURCE_PATH", metadata=meta)
    return Unavailable(
        f"{path}: read failed{where}: {text}", reason="SOURCE_READ_FAILED", metadata=meta
    )


def _pread_exact(fd: int, path: str, size: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    done = 0
    while done < size:
        try:
            chunk = os.pread(fd, size - done, offset + done)
        except OSError as err:
            raise _os_error(path, err, offset + done) from err
        if not chunk:
            raise FailedPrecondition(
                f"{path}: file ended at offset {offset + done} while reading its header",
                reason="SOURCE_CHANGED",
                metadata={"file": path, "offset": offset + done},
            )
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def _check_inside(fd: int, path: str, roots: Sequence[str]) -> None:
    """Refuse a file whose real path (that of the open fd, so no later symlink
    swap can change the answer) lies outside every allowed root."""
    real = os.readlink(f"/proc/self/fd/{fd}")
    if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots):
        raise PermissionDenied(
            f"{path} leads to {real}, outside the allowed roots ({', '.join(roots)})",
            reason="SOURCE_NOT_ALLOWED",
            metadata={"file": path, "real_path": real},
        )


def _read_header(
    path: str, max_header_bytes: int, roots: Sequence[str] = ()
) -> tuple[os.stat_result, bytes]:
    """Stat `path` and return its first 8 + N bytes, checking N (and, given
    roots, that the file really lies under one of them)."""
    try:
        # O_NONBLOCK so that a FIFO posing as a shard can't hang us; no effect on files.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise _os_error(path, err) from err
    try:
        if roots:
            _check_inside(fd, path, roots)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(
                f"{path}: not a regular file", reason="UNSUPPORTED_SOURCE", metadata={"file": path}
            )
        if st.st_size < 8:
            _invalid(path, f"file is {st.st_size} bytes, shorter than the 8-byte header length")
        prefix = _pread_exact(fd, path, 8, 0)
        n = int.from_bytes(prefix, "little")
        if n == 0:
            _invalid(path, "header length at offset 0 is 0", offset=0)
        if n > max_header_bytes:
            _invalid(path, f"huge header: {n} bytes at offset 0 > {max_header_bytes}", offset=0)
        if 8 + n > st.st_size:
            _invalid(
                path,
                f"header length {n} at offset 0 runs past the end of the file ({st.st_size} bytes)",
                offset=0,
            )
        return st, prefix + _pread_exact(fd, path, n, 8)
    finally:
        os.close(fd)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _unique_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_uint(value: object) -> bool:
    # bool is an int subclass in Python; JSON `true` is not a dimension.
    return type(value) is int and 0 <= value <= _MAX_INT


def _numel(shape: list[int]) -> int | None:
    """Element count, or None past 2**64 (the crate's ValidationOverflow).

    Stops early so a hostile header can't make us multiply huge integers.
    """
    if 0 in shape:
        return 0
    numel = 1
    for d in shape:
        numel *= d
        if numel > _MAX_INT:
            return None
    return numel


def _parse_header(
    path: str, file_index: int, raw: bytes, file_size: int
) -> tuple[list[TensorInfo], dict[str, str]]:
    """Validate a header (`raw` = the first 8 + N bytes) and return its tensors."""
    try:
        text = raw[8:].decode("utf-8")
    except UnicodeDecodeError as err:
        _invalid(path, f"header is not UTF-8 (offset {8 + err.start})", offset=8 + err.start)
    try:
        doc = json.loads(text, object_pairs_hook=_unique_object, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:  # deep nesting exhausts the stack
        pos = getattr(err, "pos", None)
        offset = 8 + len(text[:pos].encode()) if isinstance(pos, int) else 8
        _invalid(path, f"header is not valid JSON at offset {offset}: {err}", offset=offset)
    if not isinstance(doc, dict):
        _invalid(path, f"header is a JSON {type(doc).__name__}, not an object", offset=8)

    data_start = len(raw)
    data_len = file_size - data_start
    metadata: dict[str, str] = {}
    spans: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, entry in doc.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                _invalid(path, "__metadata__ must be an object of string to string")
            metadata = dict(entry)
            continue
        if not name:
            _invalid(path, "a tensor has an empty name", tensor=name)
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            _invalid(path, f"{where}: entry is not an object", tensor=name)
        if entry.keys() != _ENTRY_KEYS:
            missing = sorted(_ENTRY_KEYS - entry.keys())
            extra = sorted(entry.keys() - _ENTRY_KEYS)
            _invalid(path, f"{where}: missing keys {missing}, unexpected keys {extra}", tensor=name)
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            _invalid(path, f"{where}: unknown dtype {dtype!r}", tensor=name)
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            _invalid(
                path, f"{where}: shape {shape!r} is not a list of non-negative ints", tensor=name
            )
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
            _invalid(
                path, f"{where}: data_offsets {offsets!r} is not two non-negative ints", tensor=name
            )
        begin, end = offsets
        if begin > end:
            _invalid(
                path,
                f"{where}: data_offsets [{begin}, {end}] end before they begin",
                tensor=name,
                offset=data_start + begin,
            )
        numel = _numel(shape)
        if numel is None:
            _invalid(
                path,
                f"{where}: shape {shape} has more than 2**64 elements",
                tensor=name,
                offset=data_start + begin,
            )
        nbits = numel * DTYPES[dtype]
        if nbits % 8:
            _invalid(
                path,
                f"{where}: {numel} x {dtype} is {nbits} bits, not a whole number of bytes",
                tensor=name,
                offset=data_start + begin,
            )
        if nbits // 8 != end - begin:
            _invalid(
                path,
                f"{where}: shape {shape} x {dtype} is {nbits // 8} bytes but "
                f"data_offsets [{begin}, {end}] span {end - begin}",
                tensor=name,
                offset=data_start + begin,
            )
        if end > data_len:
            _invalid(
                path,
                f"{where}: data_offsets [{begin}, {end}] run past the data area "
                f"({data_len} bytes from offset {data_start})",
                tensor=name,
                offset=data_start + begin,
            )
        spans.append((begin, end, name, dtype, tuple(shape)))

    spans.sort()
    tensors: list[TensorInfo] = []
    cursor = 0
    prev = ""
    for begin, end, name, dtype, shape in spans:
        if begin < cursor:
            _invalid(
                path,
                f"tensor {name!r}: data_offsets [{begin}, {end}] overlap tensor "
                f"{prev!r} (ends at {cursor})",
                tensor=name,
                other=prev,
                offset=data_start + begin,
            )
        if begin > cursor:
            _invalid(
                path,
                f"tensor {name!r}: data_offsets [{begin}, {end}] leave a hole of "
                f"{begin - cursor} bytes at data offset {cursor} (file offset "
                f"{data_start + cursor})",
                tensor=name,
                offset=data_start + cursor,
            )
        tensors.append(TensorInfo(name, dtype, shape, file_index, data_start + begin, end - begin))
        cursor, prev = end, name
    if cursor != data_len:
        _invalid(
            path,
            f"{data_len - cursor} bytes after the last tensor at file offset "
            f"{data_start + cursor} are not covered by any tensor",
            offset=data_start + cursor,
        )
    return tensors, metadata


def _open_file(
    path: str, file_index: int, max_header_bytes: int, roots: Sequence[str]
) -> tuple[SourceFile, list[TensorInfo], dict[str, str]]:
    st, raw = _read_header(path, max_header_bytes, roots)
    tensors, metadata = _parse_header(path, file_index, raw, st.st_size)
    src = SourceFile(
        path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, xxhash.xxh3_64_hexdigest(raw)
    )
    return src, tensors, metadata


def _read_index(index_path: str, max_bytes: int) -> dict[str, str]:
    """Return the weight map (tensor -> shard file name) of a sharded checkpoint."""
    try:
        with open(index_path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as err:
        raise _os_error(index_path, err) from err
    if len(raw) > max_bytes:
        _invalid(index_path, f"index is larger than {max_bytes} bytes")
    try:
        doc = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_unique_object, parse_constant=_reject_constant
        )
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        _invalid(index_path, f"index is not valid UTF-8 JSON: {err}")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        _invalid(index_path, "index has no non-empty `weight_map` object")
    for name, shard in weight_map.items():
        if not name:
            _invalid(index_path, "weight_map has an empty tensor name", tensor=name)
        if not isinstance(shard, str):
            _invalid(index_path, f"weight_map[{name!r}] is not a file name", tensor=name)
        # Shards must be siblings of the index: a name that could leave the
        # directory (or name it) would let a checkpoint read arbitrary files.
        if shard in ("", ".", "..") or any(c in shard for c in "/\\\0"):
            _invalid(
                index_path,
                f"weight_map[{name!r}] = {shard!r} is not a plain file name inside the directory",
                tensor=name,
                shard=shard,
            )
    return weight_map


def _open_sharded(root: str, max_header_bytes: int, roots: Sequence[str]) -> Checkpoint:
    index_path = os.path.join(root, INDEX_FILE)
    weight_map = _read_index(index_path, max_header_bytes)
    shards = sorted(set(weight_map.values()))
    files: list[SourceFile] = []
    tensors: list[TensorInfo] = []
    first_metadata: dict[str, str] = {}
    for i, shard in enumerate(shards):
        shard_path = os.path.join(root, shard)
        if not os.path.exists(shard_path):
            listed = next(t for t, s in weight_map.items() if s == shard)
            _invalid(
                index_path,
                f"shard {shard!r} (holding tensor {listed!r}) is missing",
                tensor=listed,
                shard=shard,
            )
        src, found, metadata = _open_file(shard_path, i, max_header_bytes, roots)
        if i == 0:
            first_metadata = metadata
        files.append(src)
        tensors.extend(found)
    # Check duplicates before index agreement: a tensor in two shards is the
    # root cause, and "not mapped to this shard" would hide it.
    owner: dict[str, str] = {}
    for t in tensors:
        shard_path = files[t.file_index].path
        if t.name in owner:
            _invalid(
                shard_path,
                f"tensor {t.name!r} at offset {t.file_offset} is also in shard {owner[t.name]!r}",
                tensor=t.name,
                offset=t.file_offset,
            )
        owner[t.name] = shards[t.file_index]
    for t in tensors:
        if weight_map.get(t.name) != shards[t.file_index]:
            _invalid(
                files[t.file_index].path,
                f"tensor {t.name!r} at offset {t.file_offset} is "
                f"not mapped to this shard in {INDEX_FILE} (mapped to "
                f"{weight_map.get(t.name)!r})",
                tensor=t.name,
                offset=t.file_offset,
            )
    for name, shard in weight_map.items():
        if name not in owner:
            _invalid(
                os.path.join(root, shard),
                f"tensor {name!r} listed in {INDEX_FILE} is not in this shard",
                tensor=name,
            )
    return Checkpoint(root, tuple(files), tuple(tensors), MappingProxyType(first_metadata))


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    max_header_bytes: int = 100 * 2**20,
    allowed_roots: Sequence[str] = (),
) -> Checkpoint:
    """Parse a `.safetensors` file or a checkpoint directory (sharded or not).

    A directory holding `model.safetensors.index.json` is sharded; otherwise it
    must hold `model.safetensors`. Raises NotFound (SOURCE_NOT_FOUND),
    InvalidArgument (UNSUPPORTED_SOURCE, INVALID_CHECKPOINT), PermissionDenied
    or Unavailable (SOURCE_READ_FAILED). With `allowed_roots`, every file
    opened (shards and symlinked files included) must really lie under one of
    them, else PermissionDenied (SOURCE_NOT_ALLOWED). Later reads check each
    file's inode, so a file swapped after this check is refused too.
    """
    given = os.fspath(path)
    try:
        resolved = os.path.realpath(given, strict=True)
        st = os.stat(resolved)
    except FileNotFoundError as err:
        raise NotFound(
            f"{given}: no such file or directory",
            reason="SOURCE_NOT_FOUND",
            metadata={"file": given},
        ) from err
    except OSError as err:
        raise _os_error(given, err) from err
    if stat.S_ISDIR(st.st_mode):
        if os.path.exists(os.path.join(resolved, INDEX_FILE)):
            ckpt = _open_sharded(resolved, max_header_bytes, allowed_roots)
        elif os.path.isfile(os.path.join(resolved, SINGLE_FILE)):
            src, tensors, metadata = _open_file(
                os.path.join(resolved, SINGLE_FILE), 0, max_header_bytes, allowed_roots
            )
            ckpt = Checkpoint(resolved, (src,), tuple(tensors), MappingProxyType(metadata))
        else:
            raise InvalidArgument(
                f"{resolved}: directory has neither {INDEX_FILE} nor {SINGLE_FILE}",
                reason="UNSUPPORTED_SOURCE",
                metadata={"file": resolved},
            )
    elif stat.S_ISREG(st.st_mode) and (
        given.endswith(".safetensors") or resolved.endswith(".safetensors")
    ):
        src, tensors, metadata = _open_file(resolved, 0, max_header_bytes, allowed_roots)
        ckpt = Checkpoint(resolved, (src,), tuple(tensors), MappingProxyType(metadata))
    else:
        hint = " (pass its directory)" if given.endswith(INDEX_FILE) else ""
        raise InvalidArgument(
            f"{given}: not a .safetensors file or a checkpoint directory{hint}",
            reason="UNSUPPORTED_SOURCE",
            metadata={"file": given},
        )
    return ckpt


# Re-exported for the modules that import them from here. Imported last: the
# reader needs this module's dataclasses and `_read_header`, all defined above.
from torpord.storage.reader import check_unchanged, read_tensors  # noqa: E402
