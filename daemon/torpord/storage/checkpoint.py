"""Opening a checkpoint: one `.safetensors` file, or a directory holding
`model.safetensors` or `model.safetensors.index.json` and its shards.

Every file is opened through `torpord.storage.sources` (checked against the
allowed roots as opened, a regular file, read as that very inode) and
parsed by `torpord.storage.safetensors`. The index is JSON read within
bounds (`torpor.boundedjson`). Limits hold for the checkpoint as a
whole: MAX_TENSORS tensors, MAX_SHARDS files, and MAX_HEADER_BYTES of
headers in all.

Error text names what the caller gave (the source path), files once they
have been opened and checked, entries by ordinal and places by offset; never
a name read from a file that did not pass the checks, nor anything a file
holds (tensor names, shard names, JSON).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

from torpor import boundedjson
from xxhash import xxh3_64_hexdigest

from torpord.errors import InvalidArgument
from torpord.storage.header import invalid, parse_header, read_header, too_large, unicode_ok
from torpord.storage.safetensors import (
    INDEX_FILE,
    MAX_HEADER_BYTES,
    MAX_SHARDS,
    MAX_TENSORS,
    SINGLE_FILE,
    Checkpoint,
    SourceFile,
    TensorInfo,
)
from torpord.storage.sources import Opened, open_entry, open_source, ordinal, os_error, read_fd

__all__ = ["open_checkpoint"]

# An index is {"metadata": {...}, "weight_map": {name: file}}; some tools nest
# a little more in "metadata".
_INDEX_DEPTH = 32
# Strings an index may hold beside two per weight_map entry (its metadata).
_INDEX_EXTRA_STRINGS = 2**16


@dataclass
class _Budget:
    """What is left of the checkpoint's limits as its files are parsed."""

    tensors: int
    header_bytes: int
    max_tensors: int
    max_header_bytes: int


@dataclass
class _Read:
    """A file's header as read, before it is parsed (no descriptor held)."""

    path: str
    st: os.stat_result
    raw: bytes


def _read(opened: Opened, budget: _Budget) -> _Read:
    fd = read_fd(opened)
    try:
        st = os.fstat(fd)
        raw = read_header(fd, opened.path, st.st_size, budget.max_header_bytes)
    finally:
        os.close(fd)
    budget.header_bytes -= len(raw) - 8
    if budget.header_bytes < 0:
        too_large(
            opened.path,
            f"the headers of the checkpoint's files add up to more than"
            f" {budget.max_header_bytes} bytes",
            budget.max_header_bytes,
        )
    return _Read(opened.path, st, raw)


def _parse(
    read: _Read, file_index: int, budget: _Budget
) -> tuple[SourceFile, list[TensorInfo], list[int], dict[str, str]]:
    tensors, entries, metadata = parse_header(
        read.path,
        file_index,
        read.raw,
        read.st.st_size,
        max_tensors=budget.tensors,
        limit=budget.max_tensors,
    )
    budget.tensors -= len(tensors)
    st = read.st
    src = SourceFile(
        read.path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, xxh3_64_hexdigest(read.raw)
    )
    return src, tensors, entries, metadata


def _read_all(fd: int, path: str, limit: int) -> bytes:
    """Up to limit + 1 bytes of the file open as `fd`."""
    chunks: list[bytes] = []
    got = 0
    while got <= limit:
        try:
            chunk = os.pread(fd, limit + 1 - got, got)
        except OSError as err:
            raise os_error(f"{path}: read failed at offset {got}", err, {"file": path}) from err
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _strings_ok(doc: object) -> bool:
    """No string (key or value) anywhere in the parsed JSON `doc` holds a lone
    surrogate. (Depth is bounded by the parse, the walk is iterative anyway.)"""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not unicode_ok(item):
                return False
        elif isinstance(item, dict):
            if not all(unicode_ok(k) for k in item):
                return False
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _read_index(index: Opened, budget: _Budget) -> list[tuple[str, str]]:
    """The weight map (tensor -> shard file name) of a sharded checkpoint, in order."""
    path = index.path
    fd = read_fd(index)
    try:
        raw = _read_all(fd, path, budget.max_header_bytes)
    finally:
        os.close(fd)
    if len(raw) > budget.max_header_bytes:
        too_large(
            path,
            f"the index is larger than {budget.max_header_bytes} bytes",
            budget.max_header_bytes,
        )
    # Bounded before parsing, as a header is: two strings per tensor.
    quotes = raw.count(b'"') - raw.count(b'\\"')
    if quotes > 2 * (2 * budget.max_tensors + _INDEX_EXTRA_STRINGS):
        too_large(
            path,
            f"the index holds more strings than {budget.max_tensors} tensors"
            " (the most a checkpoint may hold) need",
            budget.max_tensors,
        )
    try:
        doc = boundedjson.loads(raw, max_bytes=budget.max_header_bytes, max_depth=_INDEX_DEPTH)
    except boundedjson.BoundedJSONError as err:
        invalid(path, f"the index is {err}", offset=err.offset or 0)
    if not _strings_ok(doc):
        invalid(path, "the index holds a lone UTF-16 surrogate (not valid Unicode)")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        invalid(path, "the index has no non-empty `weight_map` object")
    if len(weight_map) > budget.max_tensors:
        too_large(
            path,
            f"weight_map lists more than {budget.max_tensors} tensors, the most allowed",
            budget.max_tensors,
        )
    for number, (name, shard) in enumerate(weight_map.items(), 1):
        where = f"weight_map's {ordinal(number)} entry"
        if not name:
            invalid(path, f"{where} has an empty tensor name", entry=number)
        if not isinstance(shard, str):
            invalid(path, f"{where} does not name a file", entry=number)
        # Shards must be siblings of the index: a name that could leave the
        # directory (or name it) would let a checkpoint read arbitrary files.
        if shard in ("", ".", "..") or any(c in shard for c in "/\\\0"):
            invalid(
                path,
                f"{where} does not name a plain file in the checkpoint's directory",
                entry=number,
            )
    return list(weight_map.items())


def _read_shards(
    directory: Opened, index: Opened, roots: Sequence[str], budget: _Budget
) -> tuple[list[tuple[str, str]], list[str], list[_Read]]:
    """The weight map, its shards (sorted) and their headers as read."""
    weight_map = _read_index(index, budget)
    first_entry: dict[str, int] = {}  # shard name -> the first weight_map entry naming it
    for number, (_, shard) in enumerate(weight_map, 1):
        first_entry.setdefault(shard, number)
    if len(first_entry) > MAX_SHARDS:
        too_large(index.path, f"weight_map names more than {MAX_SHARDS} files", MAX_SHARDS)
    shards = sorted(first_entry)
    reads: list[_Read] = []
    for shard in shards:
        number = first_entry[shard]
        opened = open_entry(
            directory,
            shard,
            roots,
            label=f"the file that weight_map's {ordinal(number)} entry names (in {index.path})",
            metadata={"file": index.path, "entry": number},
        )
        if opened is None:
            invalid(
                index.path,
                f"weight_map's {ordinal(number)} entry names a file that is missing",
                entry=number,
            )
        try:
            reads.append(_read(opened, budget))
        finally:
            opened.close()
    return weight_map, shards, reads


def _sharded(
    path: str,
    index_path: str,
    weight_map: list[tuple[str, str]],
    shards: list[str],
    reads: list[_Read],
    budget: _Budget,
) -> Checkpoint:
    files: list[SourceFile] = []
    tensors: list[TensorInfo] = []
    entries: list[int] = []  # each tensor's entry in its file's header
    first_metadata: dict[str, str] = {}
    for i, read in enumerate(reads):
        src, found, found_entries, metadata = _parse(read, i, budget)
        if i == 0:
            first_metadata = metadata
        files.append(src)
        tensors.extend(found)
        entries.extend(found_entries)
    _check_agreement(index_path, weight_map, shards, files, tensors, entries)
    return Checkpoint(path, tuple(files), tuple(tensors), MappingProxyType(first_metadata))


def _check_agreement(
    index_path: str,
    weight_map: list[tuple[str, str]],
    shards: list[str],
    files: list[SourceFile],
    tensors: list[TensorInfo],
    entries: list[int],
) -> None:
    """Every tensor is in exactly one shard, the one the index maps it to."""
    # Duplicates first: a tensor in two shards is the root cause, and "not
    # mapped to this shard" would hide it.
    owner: dict[str, tuple[int, int]] = {}  # tensor -> (file index, header entry)
    for t, entry in zip(tensors, entries, strict=True):
        if t.name in owner:
            other, other_entry = owner[t.name]
            invalid(
                files[t.file_index].path,
                f"the {ordinal(entry)} entry of its header holds a tensor that"
                f" {files[other].path} holds too (its {ordinal(other_entry)} entry)",
                entry=entry,
                offset=t.file_offset,
            )
        owner[t.name] = (t.file_index, entry)
    file_of = {name: i for i, name in enumerate(shards)}
    mapped = dict(weight_map)
    for t, entry in zip(tensors, entries, strict=True):
        shard = mapped.get(t.name)
        if shard is None or file_of[shard] != t.file_index:
            elsewhere = (
                "does not list" if shard is None else f"maps to {files[file_of[shard]].path}"
            )
            invalid(
                files[t.file_index].path,
                f"the {ordinal(entry)} entry of its header holds a tensor that"
                f" {INDEX_FILE} {elsewhere}",
                entry=entry,
                offset=t.file_offset,
            )
    for number, (name, shard) in enumerate(weight_map, 1):
        if name not in owner:
            invalid(
                files[file_of[shard]].path,
                f"weight_map's {ordinal(number)} entry in {INDEX_FILE} names a tensor"
                " that this file does not hold",
                entry=number,
            )


def _read_directory(
    directory: Opened, roots: Sequence[str], budget: _Budget
) -> tuple[str, list[tuple[str, str]], list[str], list[_Read]] | _Read:
    """What a checkpoint directory holds: (index path, weight map, shards,
    their headers) if it is sharded, else its single file's header."""
    index = open_entry(directory, INDEX_FILE, roots)
    if index is not None:
        try:
            return (index.path, *_read_shards(directory, index, roots, budget))
        finally:
            index.close()
    single = open_entry(directory, SINGLE_FILE, roots)
    if single is None:
        raise InvalidArgument(
            f"{directory.path}: directory has neither {INDEX_FILE} nor {SINGLE_FILE}",
            reason="UNSUPPORTED_SOURCE",
            metadata={"file": directory.path},
        )
    try:
        return _read(single, budget)
    finally:
        single.close()


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    allowed_roots: Sequence[str] = (),
    max_tensors: int = MAX_TENSORS,
) -> Checkpoint:
    """Parse a `.safetensors` file or a checkpoint directory (sharded or not).

    A directory holding `model.safetensors.index.json` is sharded; otherwise it
    must hold `model.safetensors`. Raises NotFound (SOURCE_NOT_FOUND),
    InvalidArgument (UNSUPPORTED_SOURCE for what is not a regular file or a
    checkpoint directory, INVALID_SOURCE_PATH, INVALID_CHECKPOINT,
    CHECKPOINT_TOO_LARGE), PermissionDenied (SOURCE_PERMISSION_DENIED) or
    Unavailable (SOURCE_READ_FAILED). With `allowed_roots`, every file and
    directory opened must really lie under one of them, else PermissionDenied
    (SOURCE_NOT_ALLOWED). Later reads check each file's inode and size, so a
    file swapped after this is refused too.

    Descriptors are held only while reading: every file is closed before
    the headers are parsed (seconds at the tensor limit).
    """
    given = os.fspath(path)
    roots = tuple(allowed_roots)
    budget = _Budget(max_tensors, max_header_bytes, max_tensors, max_header_bytes)
    source = open_source(given, roots)
    try:
        # Shown from here on as where it really is (as opened and checked).
        real = source.path = source.real
        if stat.S_ISDIR(source.st.st_mode):
            found = _read_directory(source, roots, budget)
        elif given.endswith(".safetensors") or real.endswith(".safetensors"):
            found = _read(source, budget)
        else:
            hint = " (pass its directory)" if given.endswith(INDEX_FILE) else ""
            raise InvalidArgument(
                f"{given}: not a .safetensors file or a checkpoint directory{hint}",
                reason="UNSUPPORTED_SOURCE",
                metadata={"file": given},
            )
    finally:
        source.close()
    if isinstance(found, _Read):
        src, tensors, _, metadata = _parse(found, 0, budget)
        return Checkpoint(real, (src,), tuple(tensors), MappingProxyType(metadata))
    return _sharded(real, *found, budget)
