"""An image's manifest: what brings an image back after a daemon restart.

An image (torpord.core.images) has no source file: once every one of its
groups has a copy in the disk cache, the daemon writes a manifest next to
the entries (torpord.storage.imagefiles says where and how), and at its next
start registers the image again, asleep, from those copies. The manifest is
one JSON object:

    {"format": "torpor-image/1", "checksum_kind": ..., "fingerprint": ...,
     "model_id": ..., "device": ..., "layout_hash": ...,
     "groups": [{"name", "size", "checksum", "key",
                 "tensors": [{"name", "dtype", "shape", "offset"}, ...]}, ...]}

Its file is named after its fingerprint (`manifest_name`), so there is one
per image. It is read as anyone could have written it: parsed within bounds
(torpor.boundedjson), every field exactly of its type and within its range
(`decode`); the catalogue is then checked as strictly as a publisher's
(torpord.storage.catalogue, by the caller), and the entries must be in the
cache with the recorded sizes and checksums. BadManifest says what is wrong
by position ("group 3's tensor 7") and never quotes what the file holds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import xxhash
from torpor.boundedjson import BoundedJSONError, loads

from torpord.errors import InvalidArgument
from torpord.storage.catalogue import (
    MAX_GROUP_BYTES,
    MAX_GROUP_TENSORS,
    CatalogueGroup,
    CatalogueTensor,
    check_fingerprint,
)
from torpord.storage.checksum import KIND as CHECKSUM_KIND
from torpord.storage.layers import MAX_LAYERS, LayerPlan
from torpord.storage.safetensors import MAX_TENSORS

__all__ = [
    "FORMAT",
    "MAX_MANIFEST_BYTES",
    "BadManifest",
    "ImageManifest",
    "ManifestGroup",
    "catalogue_of",
    "decode",
    "encode",
    "manifest_name",
]

FORMAT = "torpor-image/1"
# A catalogue arrives in one gRPC message of at most 4 MiB; its JSON is a few
# times that at worst.
MAX_MANIFEST_BYTES = 64 << 20
_DEPTH = 6  # object > groups > group > tensors > tensor > shape
_MAX_RANK = 64  # (the catalogue's own limit is lower: it says so)
_MAX_DIM = 1 << 62
_MAX_TEXT = 1024  # bytes: a model id, a device, a group or tensor name, a dtype

_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_FIELDS = {"format", "checksum_kind", "fingerprint", "model_id", "device", "layout_hash", "groups"}
_GROUP_FIELDS = {"name", "size", "checksum", "key", "tensors"}
_TENSOR_FIELDS = {"name", "dtype", "shape", "offset"}


class BadManifest(ValueError):
    """A manifest that is not one this torpord would write; the message says
    why without quoting the file."""


@dataclass(frozen=True)
class ManifestGroup:
    """One group of the image: its catalogue, its slab's checksum, and the key
    of its entry in the disk cache."""

    group: CatalogueGroup
    checksum: str
    key: str


@dataclass(frozen=True)
class ImageManifest:
    fingerprint: str
    model_id: str
    device: str  # where it was (informational: it comes back there if that exists)
    layout_hash: str
    groups: tuple[ManifestGroup, ...]


def manifest_name(fingerprint: str) -> str:
    """The manifest's file name: a hash of the fingerprint (which is any text)."""
    return xxhash.xxh3_128_hexdigest(fingerprint.encode(errors="surrogatepass")) + ".json"


def catalogue_of(plan: LayerPlan) -> CatalogueGroup:
    """The catalogue a layer was planned from (the inverse of plan_image)."""
    return CatalogueGroup(
        plan.name,
        plan.size,
        tuple(
            CatalogueTensor(p.tensor.name, p.tensor.dtype, tuple(p.tensor.shape), p.slab_offset)
            for p in plan.tensors
        ),
    )


def encode(manifest: ImageManifest) -> bytes:
    return json.dumps(
        {
            "format": FORMAT,
            "checksum_kind": CHECKSUM_KIND,
            "fingerprint": manifest.fingerprint,
            "model_id": manifest.model_id,
            "device": manifest.device,
            "layout_hash": manifest.layout_hash,
            "groups": [
                {
                    "name": g.group.name,
                    "size": g.group.size,
                    "checksum": g.checksum,
                    "key": g.key,
                    "tensors": [
                        {
                            "name": t.name,
                            "dtype": t.dtype,
                            "shape": list(t.shape),
                            "offset": t.slab_offset,
                        }
                        for t in g.group.tensors
                    ],
                }
                for g in manifest.groups
            ],
        },
        separators=(",", ":"),
    ).encode()


def _int(value: object, top: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= top:
        raise BadManifest(f"{what} is not an integer from 0 to {top}")
    return value


def _text(value: object, what: str, pattern: re.Pattern[str] | None = None) -> str:
    if (
        not isinstance(value, str)
        or not value
        or len(value.encode(errors="surrogatepass")) > _MAX_TEXT
    ):
        raise BadManifest(f"{what} is not a string of 1 to {_MAX_TEXT} bytes")
    if not value.isprintable() or (pattern is not None and not pattern.fullmatch(value)):
        raise BadManifest(f"{what} is not of the form torpord writes")
    return value


def _object(value: object, fields: set[str], what: str) -> dict[str, object]:
    if not isinstance(value, dict) or set(value) != fields:
        raise BadManifest(f"{what} is not an object of exactly {sorted(fields)}")
    return value


def _list(value: object, most: int, what: str) -> list[object]:
    if not isinstance(value, list) or len(value) > most:
        raise BadManifest(f"{what} is not a list of at most {most}")
    return value


def _tensor(value: object, what: str) -> CatalogueTensor:
    t = _object(value, _TENSOR_FIELDS, what)
    shape = _list(t["shape"], _MAX_RANK, f"{what}'s shape")
    return CatalogueTensor(
        _text(t["name"], f"{what}'s name"),
        _text(t["dtype"], f"{what}'s dtype"),
        tuple(_int(d, _MAX_DIM, f"{what}'s dimension {i}") for i, d in enumerate(shape)),
        _int(t["offset"], MAX_GROUP_BYTES, f"{what}'s offset"),
    )


def _group(value: object, what: str) -> ManifestGroup:
    g = _object(value, _GROUP_FIELDS, what)
    tensors = _list(g["tensors"], MAX_GROUP_TENSORS, f"{what}'s tensors")
    return ManifestGroup(
        CatalogueGroup(
            _text(g["name"], f"{what}'s name"),
            _int(g["size"], MAX_GROUP_BYTES, f"{what}'s size"),
            tuple(_tensor(t, f"{what}'s tensor {i}") for i, t in enumerate(tensors)),
        ),
        _text(g["checksum"], f"{what}'s checksum", _HEX16),
        _text(g["key"], f"{what}'s disk cache key", _HEX32),
    )


def decode(name: str, raw: bytes) -> ImageManifest:
    """The manifest in file `name`, checked field by field (not yet its
    catalogue: see torpord.storage.catalogue.plan_image); BadManifest if
    anything is not exactly as torpord writes it."""
    try:
        value = loads(raw, max_bytes=MAX_MANIFEST_BYTES, max_depth=_DEPTH)
    except BoundedJSONError as err:
        raise BadManifest(f"it is not valid JSON ({err})") from None
    m = _object(value, _FIELDS, "it")
    if m["format"] != FORMAT:
        raise BadManifest(f"it is not of the format {FORMAT}")
    if m["checksum_kind"] != CHECKSUM_KIND:
        raise BadManifest("its checksums are of another definition than this torpord's")
    fingerprint = m["fingerprint"]
    if not isinstance(fingerprint, str):
        raise BadManifest("its fingerprint is not a string")
    try:
        check_fingerprint(fingerprint)
        fingerprint.encode()
    except (InvalidArgument, UnicodeEncodeError):
        raise BadManifest("its fingerprint is not valid") from None
    if manifest_name(fingerprint) != name:
        raise BadManifest("its fingerprint is not the one its file name says")
    groups = tuple(
        _group(g, f"group {i}") for i, g in enumerate(_list(m["groups"], MAX_LAYERS, "its groups"))
    )
    if not groups or sum(len(g.group.tensors) for g in groups) > MAX_TENSORS:
        raise BadManifest(f"it has no groups, or more than {MAX_TENSORS} tensors in all")
    return ImageManifest(
        fingerprint,
        _text(m["model_id"], "its model_id"),
        _text(m["device"], "its device"),
        _text(m["layout_hash"], "its layout hash", _HEX16),
        groups,
    )
