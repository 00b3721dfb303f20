"""Building a model's `Policy` for LoadModel, RegisterModel and SetModelPolicy.

    client.register_model("llama", "/models/llama", policy=make_policy(
        idle_timeout=300, priority=5, windows=["Mon-Fri 08:00-18:00"]))

Every argument left None is left unset in the message: the daemon then takes
the model's catalogue entry's value, else its config's default (SetModelPolicy:
the model keeps its own).
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import duration_pb2

from torpor.v1 import common_pb2
from torpor.windows import Span, parse_window

__all__ = ["EVICT_TIERS", "make_policy", "windows_to_proto"]

EVICT_TIERS = {
    "host": common_pb2.TIER_HOST,
    "disk": common_pb2.TIER_DISK,
    "source": common_pb2.TIER_SOURCE,
}
_WARM_TIERS = {"host": common_pb2.TIER_HOST, "device": common_pb2.TIER_DEVICE}


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def windows_to_proto(windows: Iterable[str | Span]) -> list[common_pb2.Window]:
    """Windows in words ("Mon-Fri 08:00-18:00", see torpor.windows) or spans,
    as messages: one per day named. ValueError for bad text."""
    spans: list[Span] = []
    for window in windows:
        spans += [window] if isinstance(window, Span) else parse_window(window)
    return [
        common_pb2.Window(
            start=_duration(s.start),
            end=_duration(s.end),
            tier=_WARM_TIERS[s.tier],
            lead=_duration(s.lead),
        )
        for s in spans
    ]


def make_policy(
    *,
    idle_timeout: float | None = None,
    idle_level: int | None = None,
    priority: int | None = None,
    pinned: bool | None = None,
    evict_to: str | None = None,
    windows: Iterable[str | Span] = (),
) -> common_pb2.Policy:
    """A Policy setting the fields given: `idle_timeout` in seconds (0: never
    sleep for idleness), `idle_level` 1 or 2, `evict_to` "host", "disk" or
    "source", `windows` as torpor.windows reads them. The daemon checks the
    ranges (INVALID_POLICY names the field); bad window text or an unknown
    `evict_to` is a ValueError here."""
    policy = common_pb2.Policy(windows=windows_to_proto(windows))
    if idle_timeout is not None:
        policy.idle_timeout.CopyFrom(_duration(idle_timeout))
    if idle_level is not None:
        policy.idle_level = idle_level
    if priority is not None:
        policy.priority = priority
    if pinned is not None:
        policy.pinned = pinned
    if evict_to is not None:
        if evict_to.lower() not in EVICT_TIERS:
            raise ValueError(f"evict_to: expected host, disk or source, got {evict_to!r}")
        policy.evict_to = EVICT_TIERS[evict_to.lower()]
    return policy
