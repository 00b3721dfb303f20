"""How torporctl shows a model's use and what caused its transitions."""

from __future__ import annotations

import time

from torpor.cli.format import ago, cause_label, kind_label, seconds, timestamp
from torpor.v1 import common_pb2

__all__ = ["activity_text", "has_activity", "kind_and_cause", "last_use_cell"]


def kind_and_cause(kind: int, cause: int) -> str:
    """`sleep (idle)`, `load (user)`; the kind alone from a daemon that
    doesn't say why."""
    because = cause_label(cause)
    return f"{kind_label(kind)} ({because})" if because else kind_label(kind)


def has_activity(model: common_pb2.Model) -> bool:
    """Whether the daemon reports activity (an older one does not)."""
    return model.HasField("activity")


def _since(model: common_pb2.Model, now: float | None) -> float:
    last = model.activity.last_use_time
    return (time.time() if now is None else now) - (last.seconds + last.nanos / 1e9)


def last_use_cell(model: common_pb2.Model, now: float | None = None) -> str:
    """The list's LAST USE: `in use`, `12s ago`, or `-` when never used."""
    a = model.activity
    if a.in_use:
        return "in use"
    if not a.HasField("last_use_time"):
        return "-"
    return ago(max(0.0, _since(model, now)))


def activity_text(model: common_pb2.Model, now: float | None = None) -> str:
    """The `get` view's Activity: `in use 1, last use 2025-05-01T10:00:00Z
    (12s ago), 3 uses in the last minute, 40 in the hour, 100 in the day
    (1234 in all), busy 5.2s`, or `never used`."""
    a = model.activity
    if not a.HasField("last_use_time") and not a.uses and not a.in_use:
        return "never used"
    parts = []
    if a.in_use:
        parts.append(f"in use {a.in_use}")
    if a.HasField("last_use_time"):
        when = ago(max(0.0, _since(model, now)))
        parts.append(f"last use {timestamp(a.last_use_time)} ({when})")
    parts.append(
        f"{a.uses_last_minute} uses in the last minute, {a.uses_last_hour} in the hour,"
        f" {a.uses_last_day} in the day ({a.uses} in all)"
    )
    parts.append(f"busy {seconds(a.busy)}")
    return ", ".join(parts)
