"""GetStats between the core and torpor.v1 (torpord.server.statsconvert),
and how torporctl stats shows it (torpor.cli.stats); the real daemon:
tests/e2e/test_stats.py."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2
from torpor.cli.stats import KINDS, duration_cell, stats_text
from torpor.v1 import common_pb2
from torpord.core.stats import AcquireStats, KindStats, Spread, Stats, Window
from torpord.errors import InvalidArgument
from torpord.server.statsconvert import kind_from_proto, stats_to_proto
from torpord.types import TransitionKind


def test_every_kind_converts_and_an_unknown_one_is_refused_naming_the_field() -> None:
    assert kind_from_proto(common_pb2.TRANSITION_KIND_UNSPECIFIED) is None
    for kind in TransitionKind:
        value = common_pb2.TransitionKind.Value(f"TRANSITION_KIND_{kind.value}")
        assert kind_from_proto(value) is kind
        assert KINDS[kind.value.lower()] == value  # the CLI offers every kind
    with pytest.raises(InvalidArgument) as err:
        kind_from_proto(99)
    assert err.value.reason == "INVALID_TRANSITION_KIND"
    assert err.value.metadata == {"field": "kind", "value": "99"}


WAKES = Spread(2, 0.5, 0.9, 0.99, 0.75, 1.0)


def stats(start: float | None = 1000.0, transitions: int = 3) -> Stats:
    return Stats(
        transitions=(
            KindStats(
                "", TransitionKind.WAKE, 3, 2, 1, Spread(2, 0.5, 0.9, 0.99, 0.75, 1.0), 3 << 30, 2e9
            ),
            KindStats("m", TransitionKind.WAKE, 1, 0, 1, None, 0, 0.0),
        ),
        acquires=(AcquireStats("", 4, 1, Spread(4, 0.0004, 2.0, 65.0, 20.0, 70.0)),),
        window=Window(start, transitions, 3, 4, 1024),
    )


def test_stats_to_proto_keeps_every_figure() -> None:
    got = stats_to_proto(stats(), now=1060.5)
    every, m = got.transitions
    assert (every.model_id, every.kind) == ("", common_pb2.TRANSITION_KIND_WAKE)
    assert (every.count, every.succeeded_count, every.failed_count) == (3, 2, 1)
    assert every.duration.count == 2
    assert (every.duration.p50, every.duration.max) == (
        duration_pb2.Duration(nanos=500_000_000),
        duration_pb2.Duration(seconds=1),
    )
    assert (every.bytes, every.median_bytes_per_second) == (3 << 30, 2e9)
    assert not m.HasField("duration")  # none succeeded
    assert (got.acquires[0].count, got.acquires[0].hit_count) == (4, 1)
    assert got.window.start_time.seconds == 1000 and got.window.end_time.nanos == 500_000_000
    assert (got.window.transition_count, got.window.acquire_capacity) == (3, 1024)
    assert not stats_to_proto(stats(start=None), now=1.0).window.HasField("start_time")


def test_durations_read_short_and_never_as_zero() -> None:
    def cell(seconds: float) -> str:
        d = duration_pb2.Duration()
        d.FromNanoseconds(round(seconds * 1e9))
        return duration_cell(d)

    assert [cell(s) for s in (0.00042, 0.0042, 0.042, 0.42, 4.2, 65.0, 600.0)] == [
        "0.42ms", "4.20ms", "42ms", "420ms", "4.2s", "1m05s", "10m00s",
    ]  # fmt: skip


def test_the_text_has_the_window_a_table_per_kind_and_the_acquires() -> None:
    text = stats_text(stats_to_proto(stats(), now=1000.0 + 720))
    assert text.split("\n") == [
        "History: 3 transitions since 1970-01-01T00:16:40Z (12m ago; 3 kept at most),"
        " 4 acquires (1024 kept at most); transitions full: each new one lets the oldest go",
        "",
        "wake",
        "MODEL  COUNT  FAILED    P50    P95    P99   MAX    MOVED      RATE",
        "(all)      3       1  500ms  900ms  990ms  1.0s  3.0 GiB  2.0 GB/s",
        "m          1       1      -      -      -     -        -         -",
        "",
        "acquire (time to ready)",
        "MODEL  COUNT  HIT RATE     P50   P95    P99    MAX",
        "(all)      4       25%  0.40ms  2.0s  1m05s  1m10s",
    ]
    quiet = stats_text(stats_to_proto(stats(transitions=2), now=1000.0))
    assert "full" not in quiet and "2 transitions since" in quiet
