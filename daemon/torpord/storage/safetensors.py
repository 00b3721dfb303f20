"""Strict safetensors parsing: the format's rules, limits and records.

A safetensors file is an 8-byte little-endian header length N, N bytes of
UTF-8 JSON (tensor name -> {dtype, shape, data_offsets}, plus an optional
`__metadata__` string map), then the data area. `torpord.storage.header`
validates headers by the rules below; `torpord.storage.checkpoint` opens
files and directories (`open_checkpoint`); tensor bytes are read on demand
by `torpord.storage.reader` (`read_tensors`, `check_unchanged`). This module
imports neither: they import it.

Validation matches the reference Rust crate (`Metadata::validate` in
safetensors/src/tensor.rs) and is stricter in a few places, because a daemon
that copies bytes into slabs by offset must never trust a span it hasn't
checked:

- header length > 0, <= `max_header_bytes`, and within the file; the header
  starts with `{` (the crate's InvalidHeaderStart: anything else is not a
  safetensors file at all);
- the header is UTF-8 JSON (no NaN/Infinity, no duplicate keys, no lone
  UTF-16 surrogate escapes, no `-0`: the crate parses usize and str) holding
  an object, nested no deeper than the format needs; every entry is an object
  with exactly `dtype`, `shape` and `data_offsets` (the crate ignores extra
  keys; we reject them);
- known dtype; shape a list of non-negative ints; `data_offsets` two ints
  with begin <= end; numel x bits a whole number of bytes equal to end-begin
  (sub-byte dtypes such as F4 must end on a byte boundary, as in the crate);
- sorted by offset, the spans tile the data area exactly: the first starts at
  0, each starts where the previous ended (no overlap, no hole) and the last
  ends at the end of the file (the crate's `InvalidOffset` and
  `MetadataIncompleteBuffer`); zero-byte tensors may sit anywhere on that path;
- `__metadata__` is an object of string -> string; tensor names are non-empty;
- at most `max_tensors` tensors (MAX_TENSORS), counted before parsing.

Error text never quotes the header (it may be a file the caller can't read):
entries are named by ordinal ("the 3rd entry of the header") and by offsets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "DTYPES",
    "INDEX_FILE",
    "MAX_HEADER_BYTES",
    "MAX_METADATA_ENTRIES",
    "MAX_SHARDS",
    "MAX_TENSORS",
    "SINGLE_FILE",
    "Checkpoint",
    "SourceFile",
    "TensorInfo",
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

#: The reference crate's limit on one header; here also on all the headers
#: of a sharded checkpoint together.
MAX_HEADER_BYTES = 100 * 2**20
#: Tensors in one checkpoint. The largest public checkpoints hold about 10**5
#: (DeepSeek-V3 ~92k with its FP8 scales, Kimi-K2 ~140k, INT4 MoE variants
#: ~210k); 2**19 leaves 2.5x room while bounding what a hostile header can
#: make us parse, plan and hold (about 0.6 GB and seconds of CPU at the limit).
MAX_TENSORS = 2**19
#: Files of one sharded checkpoint (the largest public ones have a few
#: hundred); each is opened at parse time and held open while it is read.
MAX_SHARDS = 16384
#: `__metadata__` entries of one file (real files have a handful).
MAX_METADATA_ENTRIES = 16384


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

    @property
    def identity(self) -> tuple[int, int, int]:
        """(device, inode, size): what a later open must find again."""
        return (self.device, self.inode, self.size)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A parsed checkpoint: its files and every tensor in them."""

    path: str  # resolved absolute path given
    files: tuple[SourceFile, ...]
    tensors: tuple[TensorInfo, ...]  # ordered by (file_index, file_offset)
    # __metadata__ of the first file; left out of the hash (a mapping proxy has
    # none) so checkpoints can still be set members and dict keys.
    metadata: Mapping[str, str] = field(hash=False)
    # An image's fingerprint (torpord.storage.catalogue): its tensors are in
    # no file, only in the slabs its engine wrote (and their disk copies).
    fingerprint: str = ""
    # Summed once: every snapshot of a model shows it.
    data_bytes: int = field(init=False, hash=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_bytes", sum(t.nbytes for t in self.tensors))
