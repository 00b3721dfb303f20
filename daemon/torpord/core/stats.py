"""Figures over the node's recent history, for `torporctl stats`.

From the finished transitions `History` keeps (the last few thousand, any
model, any outcome, whoever caused them) and the last Acquires' figures:
per kind of transition, for every model together and per model, how many
ran and failed, and the quantiles of the succeeded ones' durations; per
model, the Acquires' hits and time to ready. Prometheus keeps longer
series (torpord.metrics); these need nothing but the daemon.

One quantile definition throughout: linear interpolation between the
closest ranks (Hyndman and Fan's type 7, numpy.percentile's default), so a
figure here is the one numpy gives for the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from torpord.core.acquire import Figure
from torpord.core.history import Finished
from torpord.core.registry import check_model_id
from torpord.types import Outcome, TransitionKind

__all__ = [
    "AcquireStats",
    "KindStats",
    "Spread",
    "Stats",
    "Window",
    "quantile",
    "summarise",
]

_T = TypeVar("_T")
_R = TypeVar("_R")


def quantile(ordered: Sequence[float], q: float) -> float:
    """The `q` quantile (0 <= q <= 1) of `ordered` (sorted ascending, not
    empty), by linear interpolation between the closest ranks."""
    if not ordered:
        raise ValueError("no samples: a quantile needs at least one")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside [0, 1]")
    rank = (len(ordered) - 1) * q
    below = math.floor(rank)
    above = min(below + 1, len(ordered) - 1)
    a, b = ordered[below], ordered[above]
    fraction = rank - below
    # From the nearer end, as numpy does: the result never leaves [a, b]
    # through rounding, and equal samples give exactly that sample.
    if fraction >= 0.5:
        return b - (b - a) * (1.0 - fraction)
    return a + (b - a) * fraction


@dataclass(frozen=True)
class Spread:
    """Quantiles, mean and maximum of some durations, in seconds."""

    count: int
    p50: float
    p95: float
    p99: float
    mean: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread | None:
        """The spread of `values`; None when there are none."""
        ordered = sorted(values)
        if not ordered:
            return None
        return cls(
            count=len(ordered),
            p50=quantile(ordered, 0.50),
            p95=quantile(ordered, 0.95),
            p99=quantile(ordered, 0.99),
            mean=math.fsum(ordered) / len(ordered),
            max=ordered[-1],
        )


@dataclass(frozen=True)
class KindStats:
    """One kind of transition, of one model or ("" model_id) of every model."""

    model_id: str
    kind: TransitionKind
    count: int  # finished, whatever the outcome
    succeeded: int
    failed: int  # rolled back or failed
    duration: Spread | None  # of the succeeded ones; None when none succeeded
    bytes: int  # moved by the succeeded ones
    median_bytes_per_second: float  # of the succeeded ones that moved bytes; 0 if none did


@dataclass(frozen=True)
class AcquireStats:
    """The Acquires of one model, or ("" model_id) of every model."""

    model_id: str
    count: int
    hits: int  # ready when asked: nothing had to move
    time_to_ready: Spread | None  # every Acquire's, hits included


@dataclass(frozen=True)
class Window:
    """What the figures cover: the node's whole history kept, filters aside."""

    start_time: float | None  # the oldest kept transition's start (epoch seconds)
    transitions: int  # kept
    transition_capacity: int  # the most kept: when full, each new one lets the oldest go
    acquires: int
    acquire_capacity: int

    @property
    def transitions_truncated(self) -> bool:
        return self.transitions >= self.transition_capacity

    @property
    def acquires_truncated(self) -> bool:
        return self.acquires >= self.acquire_capacity


@dataclass(frozen=True)
class Stats:
    # Every model's per kind first (model_id ""), then each model's (by id),
    # kinds in TransitionKind's order; kinds with no transition left out.
    transitions: tuple[KindStats, ...]
    # Likewise: every model's first, then each model's.
    acquires: tuple[AcquireStats, ...]
    window: Window


def summarise(
    finished: Sequence[Finished],
    acquires: Sequence[Figure],
    *,
    transition_capacity: int,
    acquire_capacity: int,
    model_id: str = "",
    kind: TransitionKind | None = None,
) -> Stats:
    """The figures of `finished` and `acquires` (the history kept, oldest
    first): only `model_id`'s when given (no every-model rows then), only
    `kind`'s when given (and then no Acquires). An id with no history gets
    empty figures, not NOT_FOUND: history outlives an unload; an id no model
    can have is INVALID_ARGUMENT (INVALID_MODEL_ID)."""
    if model_id:
        check_model_id(model_id)
    window = Window(
        start_time=min((f.record.start_time for f in finished), default=None),
        transitions=len(finished),
        transition_capacity=transition_capacity,
        acquires=len(acquires),
        acquire_capacity=acquire_capacity,
    )
    chosen = [
        f
        for f in finished
        if (not model_id or f.model_id == model_id) and (kind is None or f.record.kind is kind)
    ]
    figures = (
        [] if kind is not None else [a for a in acquires if not model_id or a.model_id == model_id]
    )
    return Stats(
        transitions=_per_model(chosen, lambda f: f.model_id, _kinds, overall=not model_id),
        acquires=_per_model(figures, lambda a: a.model_id, _acquires, overall=not model_id),
        window=window,
    )


def _per_model(
    items: Sequence[_T],
    model_of: Callable[[_T], str],
    summary: Callable[[str, Sequence[_T]], list[_R]],
    *,
    overall: bool,
) -> tuple[_R, ...]:
    by_model: dict[str, list[_T]] = {}
    for item in items:
        by_model.setdefault(model_of(item), []).append(item)
    rows = summary("", items) if overall and items else []
    for model_id in sorted(by_model):
        rows.extend(summary(model_id, by_model[model_id]))
    return tuple(rows)


def _kinds(model_id: str, finished: Sequence[Finished]) -> list[KindStats]:
    rows = []
    for kind in TransitionKind:
        records = [f.record for f in finished if f.record.kind is kind]
        if not records:
            continue
        ok = [r for r in records if r.outcome is Outcome.SUCCEEDED]
        rates = sorted(r.bytes_per_second for r in ok if r.bytes_per_second > 0)
        rows.append(
            KindStats(
                model_id=model_id,
                kind=kind,
                count=len(records),
                succeeded=len(ok),
                failed=len(records) - len(ok),
                duration=Spread.of(r.duration for r in ok),
                bytes=sum(r.bytes for r in ok),
                median_bytes_per_second=quantile(rates, 0.5) if rates else 0.0,
            )
        )
    return rows


def _acquires(model_id: str, figures: Sequence[Figure]) -> list[AcquireStats]:
    return [
        AcquireStats(
            model_id=model_id,
            count=len(figures),
            hits=sum(1 for a in figures if a.hit),
            time_to_ready=Spread.of(a.seconds for a in figures),
        )
    ]
