"""Reading and validating one safetensors header (see torpord.storage.safetensors
for the rules). Error text names entries by ordinal and places by offset,
never by anything the header says."""

from __future__ import annotations

import os
import re
from typing import NoReturn

from torpor import boundedjson

from torpord.errors import FailedPrecondition, InvalidArgument
from torpord.storage.safetensors import DTYPES, MAX_METADATA_ENTRIES, MAX_TENSORS, TensorInfo
from torpord.storage.sources import ordinal, os_error

__all__ = ["count_objects", "invalid", "parse_header", "read_header", "too_large", "unicode_ok"]

# The header is an object of objects of lists: depth 3.
_HEADER_DEPTH = 3
_INVALID = "INVALID_CHECKPOINT"
_TOO_LARGE = "CHECKPOINT_TOO_LARGE"
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
# The crate parses dims and offsets as usize; anything larger is corrupt.
_MAX_INT = 2**64 - 1
# From the start (or the end of the last match): everything up to the next
# `{` outside strings. Anchored matches only: a search would retry from every
# position after the last brace (quadratic).
_TO_NEXT_BRACE = re.compile(rb'(?:[^"{]++|"(?:[^"\\]++|\\.)*+")*+\{', re.DOTALL)
# A JSON string, or a minus sign followed by 0 (only outside a string, once
# the text is known to be valid JSON, can that be a number).
_STRING_OR_MINUS_ZERO = re.compile(rb'"(?:[^"\\]++|\\.)*+"|-0', re.DOTALL)


def invalid(path: str, message: str, **metadata: object) -> NoReturn:
    raise InvalidArgument(
        f"{path}: {message}", reason=_INVALID, metadata={"file": path, **metadata}
    )


def too_large(path: str, message: str, limit: int) -> NoReturn:
    raise InvalidArgument(
        f"{path}: {message}", reason=_TOO_LARGE, metadata={"file": path, "limit": limit}
    )


def _pread_exact(fd: int, path: str, size: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    done = 0
    while done < size:
        try:
            chunk = os.pread(fd, size - done, offset + done)
        except OSError as err:
            raise os_error(
                f"{path}: read failed at offset {offset + done}",
                err,
                {"file": path, "offset": offset + done},
            ) from err
        if not chunk:
            raise FailedPrecondition(
                f"{path}: file ended at offset {offset + done} while reading its header",
                reason="SOURCE_CHANGED",
                metadata={"file": path, "offset": offset + done},
            )
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def read_header(fd: int, path: str, size: int, max_header_bytes: int) -> bytes:
    """The first 8 + N bytes of the file open as `fd` (`size` bytes long),
    after checking N; `path` names it in errors."""
    if size < 8:
        invalid(path, f"file is {size} bytes, too short for a safetensors file (8 + header)")
    prefix = _pread_exact(fd, path, min(size, 9), 0)
    n = int.from_bytes(prefix[:8], "little")
    if n == 0:
        invalid(path, "header length at offset 0 is 0", offset=0)
    if size > 8 and prefix[8:9] != b"{":
        # What a text file or any other format renamed .safetensors looks
        # like (its first 8 bytes read as a huge length); the crate's
        # InvalidHeaderStart.
        invalid(
            path,
            "not a safetensors file: its header (at offset 8) does not start with '{'",
            offset=8,
        )
    if n > max_header_bytes:
        invalid(path, f"huge header: {n} bytes at offset 0 > {max_header_bytes}", offset=0)
    if 8 + n > size:
        invalid(
            path,
            f"header length {n} at offset 0 runs past the end of the file ({size} bytes)",
            offset=0,
        )
    return prefix[:8] + _pread_exact(fd, path, n, 8)


def count_objects(text: bytes, limit: int) -> int:
    """How many JSON objects `text` holds, counting no further than `limit + 1`.
    A quick count of every `{` first; only if that passes `limit` are the
    braces inside strings told apart, one object per step (so the GIL is let
    go between them)."""
    quick = text.count(b"{")
    if quick <= limit:
        return quick
    found = pos = 0
    while found <= limit and (m := _TO_NEXT_BRACE.match(text, pos)) is not None:
        found += 1
        pos = m.end()
    return found


def _minus_zero(text: bytes) -> int | None:
    """The position of a `-0` number in valid JSON `text`, if it has one."""
    if b"-0" not in text:
        return None
    for m in _STRING_OR_MINUS_ZERO.finditer(text):
        if m.group() == b"-0":
            return m.start()
    return None


def unicode_ok(text: str) -> bool:
    """False for a str holding a lone UTF-16 surrogate (from a `\\ud800`
    escape), which no UTF-8 file name or protobuf string can carry."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


def _load_header(path: str, raw: bytes, max_tensors: int, limit: int) -> dict[str, object]:
    body = raw[8:]
    # Bounded before parsing: a header holds one object per tensor (and one
    # for itself and __metadata__), at most five strings per tensor and two
    # per metadata entry. Escaped quotes are not counted (a legal file never
    # fails this; a hostile one gets at most twice as far).
    objects = max_tensors + 1 + (b'"__metadata__"' in body)
    if count_objects(body, objects) > objects:
        _too_many(path, limit)
    quotes = body.count(b'"') - body.count(b'\\"')
    if quotes > 2 * (5 * max_tensors + 1 + 2 * MAX_METADATA_ENTRIES):
        too_large(
            path,
            f"the header holds more strings than {limit} tensors (the most a checkpoint"
            f" may hold) and {MAX_METADATA_ENTRIES} metadata entries need",
            limit,
        )
    try:
        doc = boundedjson.loads(body, max_bytes=len(body), max_depth=_HEADER_DEPTH)
    except boundedjson.BoundedJSONError as err:
        offset = 8 + (err.offset or 0)
        invalid(path, f"the header (at offset 8) is {err}", offset=offset)
    if not isinstance(doc, dict):
        invalid(path, "the header is not a JSON object", offset=8)
    if len(doc) - ("__metadata__" in doc) > max_tensors:
        _too_many(path, limit)
    at = _minus_zero(body)
    if at is not None:
        invalid(path, f"the header has a negative number at offset {8 + at}", offset=8 + at)
    return doc


def _too_many(path: str, limit: int) -> NoReturn:
    too_large(path, f"the checkpoint holds more than {limit} tensors, the most allowed", limit)


def parse_header(
    path: str,
    file_index: int,
    raw: bytes,
    file_size: int,
    *,
    max_tensors: int = MAX_TENSORS,
    limit: int = MAX_TENSORS,
) -> tuple[list[TensorInfo], list[int], dict[str, str]]:
    """Validate a header (`raw` = the first 8 + N bytes) that may hold at most
    `max_tensors` tensors (what is left of the checkpoint's `limit`). Returns
    its tensors in file order, the ordinal of each one's entry in the header,
    and its `__metadata__`."""
    doc = _load_header(path, raw, max_tensors, limit)
    data_start = len(raw)
    data_len = file_size - data_start
    metadata: dict[str, str] = {}
    spans: list[tuple[int, int, int, str, str, tuple[int, ...]]] = []
    for entry_number, (name, entry) in enumerate(doc.items(), 1):
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                invalid(path, "__metadata__ must be an object of string to string")
            if len(entry) > MAX_METADATA_ENTRIES:
                too_large(
                    path,
                    f"__metadata__ has more than {MAX_METADATA_ENTRIES} entries",
                    MAX_METADATA_ENTRIES,
                )
            if not all(unicode_ok(k) and unicode_ok(v) for k, v in entry.items()):
                invalid(path, "__metadata__ holds a lone UTF-16 surrogate (not valid Unicode)")
            metadata = dict(entry)
            continue
        where = f"the {ordinal(entry_number)} entry of the header"
        meta: dict[str, object] = {"entry": entry_number}
        if not name:
            invalid(path, f"{where} has an empty tensor name", **meta)
        if not unicode_ok(name):
            invalid(path, f"{where} has a name with a lone UTF-16 surrogate", **meta)
        if not isinstance(entry, dict):
            invalid(path, f"{where} is not an object", **meta)
        if entry.keys() != _ENTRY_KEYS:
            missing = sorted(_ENTRY_KEYS - entry.keys())
            extra = len(entry.keys() - _ENTRY_KEYS)
            what = [f"lacks {', '.join(missing)}"] if missing else []
            keys = "1 key" if extra == 1 else f"{extra} keys"
            what += [f"has {keys} besides dtype, shape and data_offsets"] if extra else []
            invalid(path, f"{where} {' and '.join(what)}", **meta)
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            invalid(path, f"{where} has a dtype that safetensors does not know", **meta)
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            invalid(path, f"{where} has a shape that is not a list of non-negative ints", **meta)
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
            invalid(path, f"{where} has data_offsets that are not two non-negative ints", **meta)
        begin, end = offsets
        meta["offset"] = data_start + begin
        if begin > end:
            invalid(
                path,
                f"{where} has data_offsets [{begin}, {end}] that end before they begin",
                **meta,
            )
        numel = _numel(shape)
        if numel is None:
            invalid(path, f"{where} has a shape of more than 2**64 elements", **meta)
        nbits = numel * DTYPES[dtype]
        if nbits % 8:
            invalid(
                path, f"{where} has a shape and dtype that make no whole number of bytes", **meta
            )
        if nbits // 8 != end - begin:
            invalid(
                path,
                f"{where} has data_offsets [{begin}, {end}] that span {end - begin} bytes,"
                " not the size its shape and dtype give",
                **meta,
            )
        if end > data_len:
            invalid(
                path,
                f"{where} has data_offsets [{begin}, {end}] that run past the data area"
                f" ({data_len} bytes from offset {data_start})",
                **meta,
            )
        spans.append((begin, end, entry_number, name, dtype, tuple(shape)))

    spans.sort()
    tensors: list[TensorInfo] = []
    entries: list[int] = []
    cursor = 0
    prev = 0
    for begin, end, entry_number, name, dtype, shape in spans:
        where = f"the {ordinal(entry_number)} entry of the header"
        if begin < cursor:
            invalid(
                path,
                f"{where} has data_offsets [{begin}, {end}] that overlap those of the"
                f" {ordinal(prev)} entry (which end at {cursor})",
                entry=entry_number,
                other_entry=prev,
                offset=data_start + begin,
            )
        if begin > cursor:
            invalid(
                path,
                f"{where} has data_offsets [{begin}, {end}] that leave a hole of"
                f" {begin - cursor} bytes at data offset {cursor} (file offset"
                f" {data_start + cursor})",
                entry=entry_number,
                offset=data_start + cursor,
            )
        tensors.append(TensorInfo(name, dtype, shape, file_index, data_start + begin, end - begin))
        entries.append(entry_number)
        cursor, prev = end, entry_number
    if cursor != data_len:
        invalid(
            path,
            f"{data_len - cursor} bytes after the last tensor at file offset "
            f"{data_start + cursor} are not covered by any tensor",
            offset=data_start + cursor,
        )
    return tensors, entries, metadata
