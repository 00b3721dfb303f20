"""GetStats to and from torpor.v1: a request's kind filter to the core's
TransitionKind, and the core's Stats to a GetStatsResponse."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2
from torpor.v1 import common_pb2, node_pb2

from torpord.core.stats import AcquireStats, KindStats, Spread, Stats
from torpord.errors import InvalidArgument
from torpord.types import TransitionKind

__all__ = ["kind_from_proto", "stats_to_proto"]


def kind_from_proto(value: int) -> TransitionKind | None:
    """The kind a request asks for; None for every kind (UNSPECIFIED)."""
    if value == common_pb2.TRANSITION_KIND_UNSPECIFIED:
        return None
    try:
        name = common_pb2.TransitionKind.Name(value)  # type: ignore[arg-type]  # (any int off the wire)
    except ValueError:
        raise InvalidArgument(
            f"kind: unknown transition kind {value}",
            reason="INVALID_TRANSITION_KIND",
            metadata={"field": "kind", "value": str(value)},
        ) from None
    return TransitionKind(name.removeprefix("TRANSITION_KIND_"))


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts


def _spread(s: Spread | None) -> node_pb2.DurationStats | None:
    if s is None:
        return None
    return node_pb2.DurationStats(
        count=s.count,
        p50=_duration(s.p50),
        p95=_duration(s.p95),
        p99=_duration(s.p99),
        mean=_duration(s.mean),
        max=_duration(s.max),
    )


def _kind(k: KindStats) -> node_pb2.TransitionStats:
    return node_pb2.TransitionStats(
        model_id=k.model_id,
        kind=common_pb2.TransitionKind.Value(f"TRANSITION_KIND_{k.kind.value}"),
        count=k.count,
        succeeded_count=k.succeeded,
        failed_count=k.failed,
        duration=_spread(k.duration),
        bytes=k.bytes,
        median_bytes_per_second=k.median_bytes_per_second,
    )


def _acquire(a: AcquireStats) -> node_pb2.AcquireStats:
    return node_pb2.AcquireStats(
        model_id=a.model_id,
        count=a.count,
        hit_count=a.hits,
        time_to_ready=_spread(a.time_to_ready),
    )


def stats_to_proto(stats: Stats, now: float) -> node_pb2.GetStatsResponse:
    """`stats` as taken at `now` (epoch seconds)."""
    w = stats.window
    window = node_pb2.StatsWindow(
        end_time=_timestamp(now),
        transition_count=w.transitions,
        transition_capacity=w.transition_capacity,
        acquire_count=w.acquires,
        acquire_capacity=w.acquire_capacity,
    )
    if w.start_time is not None:
        window.start_time.CopyFrom(_timestamp(w.start_time))
    return node_pb2.GetStatsResponse(
        transitions=[_kind(k) for k in stats.transitions],
        acquires=[_acquire(a) for a in stats.acquires],
        window=window,
    )
