"""Text pieces for torporctl: sizes, rates, durations, enum labels, tables."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from google.protobuf import duration_pb2, timestamp_pb2

from torpor.v1 import common_pb2, models_pb2, node_pb2

__all__ = [
    "ago",
    "backend_label",
    "cause_label",
    "count",
    "device_label",
    "event_label",
    "human_bytes",
    "key_values",
    "kind_label",
    "outcome_label",
    "rate",
    "seconds",
    "stage_label",
    "state_label",
    "table",
    "tier_label",
    "timestamp",
]


def human_bytes(n: int) -> str:
    """`512 B`, `1.5 KiB`, `15.0 GiB` (binary units)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def rate(bytes_per_second: float) -> str:
    """`5.1 GB/s`, `350 MB/s` under 1 GB/s, `420 kB/s` under 1 MB/s (decimal
    units, as links are quoted): a slow rate never reads as `0 MB/s`."""
    if bytes_per_second >= 1e9:
        return f"{bytes_per_second / 1e9:.1f} GB/s"
    if bytes_per_second >= 1e6:
        return f"{bytes_per_second / 1e6:.0f} MB/s"
    return f"{bytes_per_second / 1e3:.0f} kB/s"


def seconds(duration: duration_pb2.Duration) -> str:
    total = duration.seconds + duration.nanos / 1e9
    if total < 1:
        return f"{total * 1000:.0f}ms"
    if total < 60:
        return f"{total:.1f}s"
    minutes, secs = divmod(int(total), 60)
    return f"{minutes}m{secs:02d}s"


def timestamp(ts: timestamp_pb2.Timestamp) -> str:
    when = datetime.datetime.fromtimestamp(ts.seconds, tz=datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(seconds_past: float) -> str:
    """`now`, `12s ago`, `5m ago`, `3h ago`, `2d ago` (a time this long past)."""
    if seconds_past < 1:
        return "now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds_past >= size:
            return f"{int(seconds_past // size)}{unit} ago"
    return f"{int(seconds_past)}s ago"


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _label(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


def _enum(wrapper: object, value: int, prefix: str) -> str:
    # A newer daemon may send a value this client does not know: show the number.
    try:
        name: str = wrapper.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        return str(value)
    return _label(name, prefix)


def state_label(state: int) -> str:
    return _enum(common_pb2.ModelState, state, "MODEL_STATE_")


def tier_label(tier: int) -> str:
    return _enum(common_pb2.Tier, tier, "TIER_")


def kind_label(kind: int) -> str:
    return _enum(common_pb2.TransitionKind, kind, "TRANSITION_KIND_")


def stage_label(stage: int) -> str:
    return _enum(common_pb2.Stage, stage, "STAGE_")


def outcome_label(outcome: int) -> str:
    return _enum(common_pb2.Outcome, outcome, "OUTCOME_")


def cause_label(cause: int) -> str:
    """`user`, `idle`, `pressure`...; empty when unspecified (an older daemon)."""
    return "" if cause == common_pb2.CAUSE_UNSPECIFIED else _enum(common_pb2.Cause, cause, "CAUSE_")


def backend_label(backend: int) -> str:
    return _enum(node_pb2.Backend, backend, "BACKEND_")


def event_label(event_type: int) -> str:
    return _enum(models_pb2.ModelEventType, event_type, "MODEL_EVENT_TYPE_")


def device_label(device: str) -> str:
    return device.removeprefix("devices/") or "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns separated by two spaces; the columns in `right` are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def key_values(pairs: Sequence[tuple[str, str]]) -> str:
    width = max((len(key) for key, _ in pairs), default=0) + 1
    return "\n".join(f"{(key + ':').ljust(width)}  {value}" for key, value in pairs)
