"""Policies to and from torpor.v1: a request's `Policy` (fields set or not)
to the core's PolicyOverrides, and a model's resolved policy to a `Policy`
with every field set."""

from __future__ import annotations

from google.protobuf import duration_pb2
from torpor.v1 import common_pb2

from torpord.core.policy import PolicyOverrides
from torpord.errors import InvalidArgument
from torpord.policies.settings import ModelPolicy, Window
from torpord.types import Tier

__all__ = ["policy_from_proto", "policy_to_proto"]

DEFAULT_LEAD = 300.0  # seconds: a window's lead when a request leaves it unset


def _seconds(d: duration_pb2.Duration) -> float:
    # Not ToTimedelta: a Duration off the wire may hold any int64 of seconds.
    return d.seconds + d.nanos / 1e9


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _tier(value: int, field: str) -> Tier:
    try:
        name = common_pb2.Tier.Name(value)  # type: ignore[arg-type]  # (any int off the wire)
    except ValueError:
        raise InvalidArgument(
            f"{field}: unknown tier {value}",
            reason="INVALID_POLICY",
            metadata={"field": field, "value": str(value)},
        ) from None
    return Tier(name.removeprefix("TIER_"))


def policy_from_proto(p: common_pb2.Policy) -> PolicyOverrides:
    """The fields a request's Policy sets (ranges are checked by the core's
    check_policy). A tier left TIER_UNSPECIFIED counts as unset."""
    evict_to = None
    if p.HasField("evict_to") and p.evict_to != common_pb2.TIER_UNSPECIFIED:
        evict_to = _tier(p.evict_to, "policy.evict_to")
    windows = tuple(
        Window(
            start=_seconds(w.start),
            end=_seconds(w.end),
            tier=Tier.HOST
            if w.tier == common_pb2.TIER_UNSPECIFIED
            else _tier(w.tier, f"policy.windows[{i}].tier"),
            lead=_seconds(w.lead) if w.HasField("lead") else DEFAULT_LEAD,
        )
        for i, w in enumerate(p.windows)
    )
    return PolicyOverrides(
        idle_timeout=_seconds(p.idle_timeout) if p.HasField("idle_timeout") else None,
        idle_level=p.idle_level if p.HasField("idle_level") else None,
        priority=p.priority if p.HasField("priority") else None,
        pinned=p.pinned if p.HasField("pinned") else None,
        evict_to=evict_to,
        windows=windows,
    )


def _tier_to_proto(tier: Tier) -> common_pb2.Tier.ValueType:
    return common_pb2.Tier.Value(f"TIER_{tier.value}")


def policy_to_proto(policy: ModelPolicy) -> common_pb2.Policy:
    """A resolved policy: every field set."""
    return common_pb2.Policy(
        idle_timeout=_duration(policy.idle_timeout),
        idle_level=policy.idle_level,
        priority=policy.priority,
        pinned=policy.pinned,
        evict_to=_tier_to_proto(policy.evict_to),
        windows=[
            common_pb2.Window(
                start=_duration(w.start),
                end=_duration(w.end),
                tier=_tier_to_proto(w.tier),
                lead=_duration(w.lead),
            )
            for w in policy.windows
        ],
    )
