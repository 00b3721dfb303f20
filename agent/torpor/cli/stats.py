"""torporctl stats: counts and P50/P95/P99 of the node's recent transitions
and Acquires (NodeService.GetStats), a table per kind, every model first."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from google.protobuf import duration_pb2, json_format

from torpor.cli.format import ago, count, human_bytes, kind_label, rate, table, timestamp
from torpor.client import Client
from torpor.v1 import common_pb2, node_pb2

__all__ = ["HANDLERS", "KINDS", "add_command", "duration_cell", "stats_text"]

# `--kind` values: the proto's kinds, lower case (load, sleep, wake, ...).
KINDS: dict[str, common_pb2.TransitionKind.ValueType] = {
    kind_label(value): value
    for value in common_pb2.TransitionKind.values()
    if value != common_pb2.TRANSITION_KIND_UNSPECIFIED
}
EVERY_MODEL = "(all)"  # (a model id starts with a letter or digit: never this)
_QUANTILES = ("P50", "P95", "P99", "MAX")


def add_command(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    stats = command(
        "stats",
        "counts and P50/P95/P99 durations of recent transitions and Acquires,"
        " of every model and each",
    )
    stats.add_argument(
        "model_id",
        metavar="MODEL_ID",
        nargs="?",
        default="",
        help="only this model's (history outlives an unload); default: every model and each",
    )
    stats.add_argument(
        "--kind",
        choices=tuple(KINDS),
        help="only this kind of transition (and no Acquires)",
    )


def duration_cell(d: duration_pb2.Duration) -> str:
    """`0.42ms`, `4.20ms`, `420ms`, `4.2s`, `1m05s`: short, and a fast
    transition never reads as `0ms`."""
    total = d.seconds + d.nanos / 1e9
    if total < 0.01:
        return f"{total * 1000:.2f}ms"
    if total < 1:
        return f"{total * 1000:.0f}ms"
    if total < 60:
        return f"{total:.1f}s"
    minutes, secs = divmod(round(total), 60)
    return f"{minutes}m{secs:02d}s"


def _quantiles(d: node_pb2.DurationStats, present: bool) -> list[str]:
    if not present:
        return ["-"] * len(_QUANTILES)
    return [duration_cell(x) for x in (d.p50, d.p95, d.p99, d.max)]


def _model(model_id: str) -> str:
    return model_id or EVERY_MODEL


def _window_line(w: node_pb2.StatsWindow) -> str:
    """`History: 6 transitions since 2026-05-01T10:00:00Z (12m ago; 4096 kept
    at most), 1 acquire (1024 kept at most)`, and which history is full."""
    taken = w.end_time.seconds + w.end_time.nanos / 1e9 if w.HasField("end_time") else time.time()
    since = ""
    if w.HasField("start_time"):
        start = w.start_time.seconds + w.start_time.nanos / 1e9
        since = f" since {timestamp(w.start_time)} ({ago(max(0.0, taken - start))};"
        since += f" {w.transition_capacity} kept at most)"
    line = (
        f"History: {count(w.transition_count, 'transition')}{since},"
        f" {count(w.acquire_count, 'acquire')} ({w.acquire_capacity} kept at most)"
    )
    full = [
        what
        for what, n, most in (
            ("transitions", w.transition_count, w.transition_capacity),
            ("acquires", w.acquire_count, w.acquire_capacity),
        )
        if most and n >= most
    ]
    if full:
        line += f"; {' and '.join(full)} full: each new one lets the oldest go"
    return line


def _kind_table(rows: Sequence[node_pb2.TransitionStats]) -> str:
    headers = ["MODEL", "COUNT", "FAILED", *_QUANTILES, "MOVED", "RATE"]
    cells = [
        [
            _model(r.model_id),
            str(r.count),
            str(r.failed_count),
            *_quantiles(r.duration, r.HasField("duration")),
            human_bytes(r.bytes) if r.bytes else "-",
            rate(r.median_bytes_per_second) if r.median_bytes_per_second > 0 else "-",
        ]
        for r in rows
    ]
    return table(headers, cells, right=tuple(range(1, len(headers))))


def _acquire_table(rows: Sequence[node_pb2.AcquireStats]) -> str:
    headers = ["MODEL", "COUNT", "HIT RATE", *_QUANTILES]
    cells = [
        [
            _model(r.model_id),
            str(r.count),
            f"{100 * r.hit_count / r.count:.0f}%" if r.count else "-",
            *_quantiles(r.time_to_ready, r.HasField("time_to_ready")),
        ]
        for r in rows
    ]
    return table(headers, cells, right=tuple(range(1, len(headers))))


def stats_text(response: node_pb2.GetStatsResponse, model_id: str = "", kind: str = "") -> str:
    """A header with the window, then a table per kind (durations of the
    succeeded transitions; RATE the median rate) and one for Acquires (time
    to ready). `model_id` and `kind`: the filters asked for, to say what
    was not found."""
    parts = [_window_line(response.window)]
    by_kind: dict[int, list[node_pb2.TransitionStats]] = {}
    for row in response.transitions:
        by_kind.setdefault(row.kind, []).append(row)
    for value, rows in by_kind.items():
        parts.append(f"\n{kind_label(value)}\n{_kind_table(rows)}")
    if response.acquires:
        parts.append(f"\nacquire (time to ready)\n{_acquire_table(response.acquires)}")
    if not response.transitions and not response.acquires:
        what = f"{kind} transitions" if kind else "transitions or acquires"
        of = f" of model {model_id!r}" if model_id else ""
        parts.append(f"No {what}{of} in this history.")
    return "\n".join(parts)


def cmd_stats(client: Client, args: argparse.Namespace) -> int:
    kind = KINDS[args.kind] if args.kind else common_pb2.TRANSITION_KIND_UNSPECIFIED
    response = client.get_stats(args.model_id, kind)
    if args.json:
        print(json_format.MessageToJson(response, indent=2, preserving_proto_field_name=True))
    else:
        print(stats_text(response, args.model_id, args.kind or ""))
    sys.stdout.flush()
    return 0


HANDLERS: dict[str, Callable[[Client, argparse.Namespace], int]] = {"stats": cmd_stats}
