"""The simulated node and its models: what a trace is replayed against.

A spec is a JSON file (read through `torpor.boundedjson`: size and depth
bounded before parsing), in human units::

    {"version": 1,
     "device": {"capacity_gib": 80},
     "host": {"capacity_gib": 400},
     "disk": {"capacity_gib": 2000},          (optional: null or absent = none)
     "bandwidth_gb_per_s": {"host_to_device": 20, "device_to_host": 20,
                            "disk_to_device": 3, "source_to_device": 2},
     "start": 1704067200,                     (optional: the clock at t = 0)
     "models": [{"id": "m00", "size_gib": 14, "layers": 32}, ...]}

Every error names the file and the key (or the model's index) and what was
expected; none quotes the file's content.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from torpor.boundedjson import BoundedJSONError, loads

from torpord.errors import InvalidArgument
from torpord.policies.view import Bandwidth

__all__ = [
    "MAX_MODELS",
    "MODEL_ID",
    "ModelSpec",
    "NodeSpec",
    "dump_spec",
    "load_spec",
    "parse_spec",
    "read_bounded",
]

GiB = 2**30
GB = 1e9
SPEC_VERSION = 1
MAX_SPEC_BYTES = 4 * 2**20
MAX_DEPTH = 6
MAX_MODELS = 10_000
MAX_LAYERS = 1_000
MAX_GIB = 1e6  # a petabyte: anything above is a typo
MONDAY = 1704067200  # 2024-01-01 00:00 UTC, a Monday: hour-of-week counts line up
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    size: int  # bytes
    layers: int = 32


@dataclass(frozen=True)
class NodeSpec:
    models: tuple[ModelSpec, ...]
    device: int  # bytes
    host: int
    disk: int | None = None  # None: no disk cache
    bandwidth: Bandwidth = field(default_factory=Bandwidth)
    start: float = MONDAY

    @property
    def total_bytes(self) -> int:
        return sum(m.size for m in self.models)

    def resized(self, device: int) -> NodeSpec:
        return NodeSpec(self.models, device, self.host, self.disk, self.bandwidth, self.start)


def _bad(where: str, key: str, expected: str) -> InvalidArgument:
    return InvalidArgument(
        f"{where}: {key}: expected {expected}",
        reason="INVALID_SPEC",
        metadata={"file": where, "key": key},
    )


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """A regular file's bytes, at most `limit` of them; a FIFO, a device or
    a directory is refused without blocking on it."""
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise InvalidArgument(
            f"{where}: cannot open the {what}: {err.strerror}",
            reason="UNREADABLE_INPUT",
            metadata={"file": where},
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(
                f"{where}: the {what} is not a regular file",
                reason="UNREADABLE_INPUT",
                metadata={"file": where},
            )
        if info.st_size > limit:
            raise InvalidArgument(
                f"{where}: the {what} has {info.st_size} bytes, more than the {limit} allowed",
                reason="INPUT_TOO_LARGE",
                metadata={"file": where, "limit": limit},
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(raw) > limit:  # it grew while we read
        raise InvalidArgument(
            f"{where}: the {what} has more than the {limit} bytes allowed",
            reason="INPUT_TOO_LARGE",
            metadata={"file": where, "limit": limit},
        )
    return raw


def _number(
    where: str, key: str, value: object, *, low: float, high: float, low_open: bool = False
) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and (value > low if low_open else value >= low) and value <= high:  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]
    bound = f"> {low:g}" if low_open else f">= {low:g}"
    raise _bad(where, key, f"a number {bound} and <= {high:g}")


def _table(where: str, key: str, value: object, allowed: set[str]) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _bad(where, key, "an object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        # A key name is not content we must hide, but it may be long: its position will do.
        raise _bad(where, key, f"only the keys {', '.join(sorted(allowed))}")
    return value


def _capacity(where: str, data: dict[str, object], key: str) -> int:
    table = _table(where, key, data.get(key), {"capacity_gib"})
    gib = _number(where, f"{key}.capacity_gib", table.get("capacity_gib"), low=0, high=MAX_GIB)
    return round(gib * GiB)


def _models(where: str, value: object) -> tuple[ModelSpec, ...]:
    if not isinstance(value, list) or not value:
        raise _bad(where, "models", "a non-empty list")
    if len(value) > MAX_MODELS:
        raise _bad(where, "models", f"at most {MAX_MODELS} models (got {len(value)})")
    seen: set[str] = set()
    out = []
    for i, item in enumerate(value):
        key = f"models[{i}]"
        entry = _table(where, key, item, {"id", "size_gib", "layers"})
        model_id = entry.get("id")
        if not isinstance(model_id, str) or not MODEL_ID.fullmatch(model_id):
            raise _bad(where, f"{key}.id", "1 to 128 of A-Z a-z 0-9 . _ - (not first . _ -)")
        if model_id in seen:
            raise _bad(where, f"{key}.id", "an id no other model has")
        seen.add(model_id)
        size_key = f"{key}.size_gib"
        gib = _number(where, size_key, entry.get("size_gib"), low=0, high=MAX_GIB, low_open=True)
        layers = entry.get("layers", 32)
        if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= MAX_LAYERS:
            raise _bad(where, f"{key}.layers", f"an integer from 1 to {MAX_LAYERS}")
        size = max(round(gib * GiB), layers)  # at least a byte per layer
        out.append(ModelSpec(model_id, size, layers))
    return tuple(out)


def parse_spec(raw: bytes, where: str) -> NodeSpec:
    """A NodeSpec from a spec file's bytes; InvalidArgument (reason
    INVALID_SPEC) naming `where` and the key otherwise."""
    try:
        data = loads(raw, max_bytes=MAX_SPEC_BYTES, max_depth=MAX_DEPTH)
    except BoundedJSONError as err:
        raise InvalidArgument(
            f"{where}: {err}", reason="INVALID_SPEC", metadata={"file": where}
        ) from None
    keys = {"version", "device", "host", "disk", "bandwidth_gb_per_s", "start", "models"}
    top = _table(where, "(top level)", data, keys)
    version = top.get("version")
    if isinstance(version, bool) or version != SPEC_VERSION:
        raise _bad(where, "version", f"{SPEC_VERSION}")
    disk = None
    if top.get("disk") is not None:
        disk = _capacity(where, top, "disk")
    paths = ("host_to_device", "device_to_host", "disk_to_device", "source_to_device")
    key = "bandwidth_gb_per_s"
    rates = _table(where, key, top.get(key, {}), set(paths))
    default = Bandwidth()
    bandwidth = Bandwidth(
        **{
            path: _number(where, f"{key}.{path}", rates[path], low=0, high=1e6, low_open=True) * GB
            if path in rates
            else getattr(default, path)
            for path in paths
        }
    )
    start = _number(where, "start", top.get("start", MONDAY), low=0, high=4e9)
    spec = NodeSpec(
        models=_models(where, top.get("models")),
        device=_capacity(where, top, "device"),
        host=_capacity(where, top, "host"),
        disk=disk,
        bandwidth=bandwidth,
        start=start,
    )
    biggest = max(m.size for m in spec.models)
    if biggest > spec.device:
        raise _bad(where, "device.capacity_gib", "room for the largest model at least")
    return spec


def load_spec(path: Path) -> NodeSpec:
    return parse_spec(read_bounded(path, MAX_SPEC_BYTES, "spec"), str(path))


def dump_spec(spec: NodeSpec) -> str:
    """The JSON text of `spec` (parse_spec reads it back to an equal spec,
    up to the rounding of sizes to bytes)."""
    bw = spec.bandwidth
    data = {
        "version": SPEC_VERSION,
        "start": spec.start,
        "device": {"capacity_gib": spec.device / GiB},
        "host": {"capacity_gib": spec.host / GiB},
        "disk": None if spec.disk is None else {"capacity_gib": spec.disk / GiB},
        "bandwidth_gb_per_s": {
            "host_to_device": bw.host_to_device / GB,
            "device_to_host": bw.device_to_host / GB,
            "disk_to_device": bw.disk_to_device / GB,
            "source_to_device": bw.source_to_device / GB,
        },
        "models": [
            {"id": m.model_id, "size_gib": m.size / GiB, "layers": m.layers} for m in spec.models
        ],
    }
    return json.dumps(data, indent=1) + "\n"
