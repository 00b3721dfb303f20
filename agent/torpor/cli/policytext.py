"""A model's policy and registration in words, for `torporctl get`."""

from __future__ import annotations

from google.protobuf import duration_pb2

from torpor.cli.format import seconds, tier_label
from torpor.v1 import common_pb2
from torpor.windows import DAY_SECONDS, DAYS, Span, format_span

__all__ = ["policy_pairs", "windows_text"]


def _span(window: common_pb2.Window) -> Span:
    def secs(d: duration_pb2.Duration) -> int:
        return int(d.seconds)

    tier = "device" if window.tier == common_pb2.TIER_DEVICE else "host"
    return Span(secs(window.start), secs(window.end), tier, secs(window.lead))


def windows_text(windows: list[common_pb2.Window]) -> str:
    """`Mon,Tue,Wed 08:00-18:00 host lead 5m; Sat 10:00-12:00 device lead 10m`:
    the days that share a time, tier and lead named together."""
    groups: dict[str, list[int]] = {}
    for window in windows:
        span = _span(window)
        if span.length > DAY_SECONDS:  # (from the API: one of its own)
            groups.setdefault(format_span(span), [])
            continue
        day, start = divmod(span.start, DAY_SECONDS)
        rest = format_span(Span(start, start + span.length, span.tier, span.lead))
        groups.setdefault(rest.removeprefix("Mon "), []).append(day)
    return "; ".join(
        f"{','.join(DAYS[d].capitalize() for d in days)} {rest}" if days else rest
        for rest, days in groups.items()
    )


def policy_pairs(model: common_pb2.Model) -> list[tuple[str, str]]:
    """`Policy` (and `Windows`) lines, none from a daemon that sends no
    policy; `Registered` for a model with a catalogue entry."""
    pairs = []
    if model.HasField("policy"):
        p = model.policy
        idle = seconds(p.idle_timeout)
        parts = [
            f"sleeps (level {p.idle_level}) after {idle} idle"
            if p.idle_timeout.seconds or p.idle_timeout.nanos
            else "never sleeps for idleness",
            f"priority {p.priority}",
            "pinned" if p.pinned else f"evicted to {tier_label(p.evict_to)}",
        ]
        pairs.append(("Policy", ", ".join(parts)))
        if p.windows:
            pairs.append(("Windows", windows_text(list(p.windows)) + " (UTC)"))
    if model.registered:
        pairs.append(("Registered", "yes: a catalogue entry (Acquire loads it from its source)"))
    return pairs
