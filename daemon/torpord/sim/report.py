"""The figures of a run, as a markdown table and a PNG plot."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torpord.sim.engine import Outcome

__all__ = ["Figures", "PlotUnavailable", "figures", "plot", "table"]

GiB = 2**30


@dataclass(frozen=True)
class Figures:
    name: str
    requests: int
    hit_rate: float
    mean: float  # time-to-ready, seconds (hits count as 0; retries included)
    p50: float
    p95: float
    p99: float
    loads: int
    wakes: int
    evictions: int
    idle_sleeps: int
    preloads: int
    switches_per_hour: float  # loads and wakes per simulated hour
    gib_hours: float  # GPU memory·time
    refusals: int  # RESOURCE_EXHAUSTED answers (each retry counts)
    refused: int  # requests refused at least once
    refused_share: float  # of all requests
    unserved: int


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile of sorted values (0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def figures(o: Outcome) -> Figures:
    ready = sorted(o.ready)
    hours = o.seconds / 3600 if o.seconds > 0 else 1.0
    return Figures(
        name=o.name,
        requests=o.requests,
        hit_rate=o.hits / o.requests if o.requests else 0.0,
        mean=sum(ready) / len(ready) if ready else 0.0,
        p50=percentile(ready, 50),
        p95=percentile(ready, 95),
        p99=percentile(ready, 99),
        loads=o.loads,
        wakes=o.wakes,
        evictions=o.evictions,
        idle_sleeps=o.idle_sleeps,
        preloads=o.preloads,
        switches_per_hour=(o.loads + o.wakes) / hours,
        gib_hours=o.device_byte_seconds / GiB / 3600,
        refusals=o.refusals,
        refused=o.refused,
        refused_share=o.refused / o.requests if o.requests else 0.0,
        unserved=o.unserved,
    )


def table(rows: Sequence[Figures]) -> str:
    """A markdown table, one row per policy."""
    head = (
        "| policy | hit rate | TTR mean s | P50 s | P95 s | P99 s | loads | wakes | evictions "
        "| idle sleeps | preloads | switches/h | GPU GiB·h | refusals | refused ≥1 | unserved |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for f in rows:
        lines.append(
            f"| {f.name} | {f.hit_rate:.1%} | {f.mean:.3f} | {f.p50:.3f} | {f.p95:.3f} "
            f"| {f.p99:.3f} | {f.loads} | {f.wakes} | {f.evictions} | {f.idle_sleeps} "
            f"| {f.preloads} | {f.switches_per_hour:.1f} | {f.gib_hours:.0f} | {f.refusals} "
            f"| {f.refused} ({f.refused_share:.1%}) | {f.unserved} |"
        )
    return "\n".join(lines) + "\n"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot(rows: Sequence[Figures], outcomes: Sequence[Outcome], path: Path, title: str) -> None:
    """Time-to-ready percentiles, their distribution, hit rate, requests
    refused at least once and GPU memory·time per policy, as one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "writing the plot needs matplotlib: pip install 'torpor[sim]' (or leave out --plot)"
        ) from None
    names = [f.name for f in rows]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    fig.suptitle("\n".join(textwrap.wrap(title, 120)))
    ax = axes[0][0]
    width = 0.8 / max(len(rows), 1)
    for i, f in enumerate(rows):
        xs = [k + i * width for k in range(4)]
        values = [max(v, 1e-3) for v in (f.mean, f.p50, f.p95, f.p99)]
        ax.bar(xs, values, width, label=f.name)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(4)], ["mean", "P50", "P95", "P99"])
    ax.set_yscale("log")
    ax.set_ylabel("time to ready, s (log; 1 ms floor)")
    ax.legend()
    ax = axes[0][1]
    for o in outcomes:
        ready = sorted(o.ready)
        step = max(1, len(ready) // 2000)  # enough points for the eye
        picks = [*range(0, len(ready), step), len(ready) - 1] if ready else []
        ax.plot([ready[k] for k in picks], [(k + 1) / len(ready) for k in picks], label=o.name)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("time to ready, s")
    ax.set_ylabel("share of requests")
    ax.legend()
    ax = axes[1][0]
    at = range(len(rows))
    ax.bar([k - 0.2 for k in at], [f.hit_rate * 100 for f in rows], 0.4, label="hit")
    ax.bar([k + 0.2 for k in at], [f.refused_share * 100 for f in rows], 0.4, label="refused ≥1")
    ax.set_xticks(list(at), names)
    ax.set_ylabel("share of requests, %")
    ax.legend()
    axes[1][1].bar(names, [f.gib_hours for f in rows])
    axes[1][1].set_ylabel("GPU memory·time, GiB·h")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
