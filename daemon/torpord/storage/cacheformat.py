"""The disk cache's entry format: what one entry file holds, and its strict check.

An entry is one slab in one file, `<root>/<key[:2]>/<key>.slab`:

    magic (12 bytes) | meta length (u32 LE) | meta (JSON) | zeros to 4 KiB | slab bytes

The meta is `{"key", "size", "checksum", "checksum_kind"}`, nothing more. A
file is an entry only if every field is exactly as torpord writes it: the
key is the file's name, the size a non-negative integer that with the header
makes the file's length, the checksum 16 hex digits of this torpord's
definition (torpord.storage.checksum). The meta is parsed within bounds
(torpor.boundedjson) and nothing it holds is ever quoted.
"""

from __future__ import annotations

import json
import re
import struct

from torpor.boundedjson import BoundedJSONError, loads

from torpord.storage.checksum import KIND as CHECKSUM_KIND

__all__ = ["DATA_OFFSET", "MAGIC", "BadEntry", "encode_head", "parse_head"]

MAGIC = b"TORPORSLAB\x00\x01"
DATA_OFFSET = 4096  # the slab's bytes start at a block boundary (O_DIRECT-ready)
_META_AT = len(MAGIC) + 4
_META_MAX = DATA_OFFSET - _META_AT

_CHECKSUM = re.compile(r"[0-9a-f]{16}")  # torpord.storage.checksum: XXH3-64, hex
_META_FIELDS = {"key", "size", "checksum", "checksum_kind"}


class BadEntry(ValueError):
    """An entry that is not (or no longer) a valid entry of ours; the message
    says why without quoting what the file holds."""


def encode_head(key: str, size: int, checksum: str) -> bytes:
    meta = json.dumps(
        {"key": key, "size": size, "checksum": checksum, "checksum_kind": CHECKSUM_KIND}
    ).encode()
    head = MAGIC + struct.pack("<I", len(meta)) + meta
    assert len(head) <= DATA_OFFSET
    return head + bytes(DATA_OFFSET - len(head))


def parse_head(head: bytes, key: str, file_bytes: int) -> tuple[int, str]:
    """An entry file's (size, checksum), checked against its name's `key` and
    its length; BadEntry if anything is not exactly as we write it."""
    if len(head) < _META_AT or not head.startswith(MAGIC):
        raise BadEntry("not a torpor slab file")
    (n,) = struct.unpack_from("<I", head, len(MAGIC))
    if n > _META_MAX:
        raise BadEntry(f"its meta length runs past the {DATA_OFFSET}-byte header")
    try:
        meta = loads(head[_META_AT : _META_AT + n], max_bytes=_META_MAX, max_depth=1)
    except BoundedJSONError as err:
        raise BadEntry(f"its meta is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or set(meta) != _META_FIELDS:
        raise BadEntry(f"its meta is not an object of exactly {sorted(_META_FIELDS)}")
    if meta["checksum_kind"] != CHECKSUM_KIND:
        raise BadEntry("its checksum is of another definition than this torpord's")
    if meta["key"] != key:
        raise BadEntry("its meta names another key than its file name")
    size = meta["size"]
    if type(size) is not int or size < 0:
        raise BadEntry("its size is not a non-negative integer")
    checksum = meta["checksum"]
    if not isinstance(checksum, str) or not _CHECKSUM.fullmatch(checksum):
        raise BadEntry("its checksum is not 16 hex digits")
    if file_bytes != DATA_OFFSET + size:
        raise BadEntry(f"it is {file_bytes} bytes, not the {DATA_OFFSET} + size its header says")
    return size, checksum
