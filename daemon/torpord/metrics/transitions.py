"""What happened, as it happened: the transitions' histograms and counts
(from the manager's history) and the Acquires' (from its Acquire listener).

Durations are observed for SUCCEEDED transitions only (a rolled-back wake's
time says nothing about how long wakes take); every outcome is counted in
`torpor_transitions_total`.

Each figure is kept twice, declared once (`Histograms`, `Counters`):
- per model (`torpor_<name>{model,…}`): a model's series appear at its
  first event, with 1, and go when the model does;
- for the node (`torpor_node_<name>{…}`, no `model` label): created at 0 for
  every value of its (bounded) labels at start and never dropped.
Prometheus counts no increase at a series' first sample, so rate() and
increase() summed over the per-model series miss each model's first load,
and every load of a model that comes and goes: node-wide rates and
quantiles (switch rate, cold-start and wake P99) are queried on the node's.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.core import Metric

from torpord.core.acquire import Figure
from torpord.core.history import Finished
from torpord.metrics.series import CounterFamily, HistogramFamily, label_value
from torpord.types import Cause, Outcome, Tier, TransitionKind

__all__ = ["Counters", "Histograms", "Transitions"]

# A sleep's level (1, 2); a wake's also 0: a wake of an OFFLOADED model.
LEVELS = ("0", "1", "2")
# The tier most of a wake's bytes came from; "none" when none moved.
SOURCES = (*(label_value(t) for t in (Tier.HOST, Tier.DISK, Tier.SOURCE)), "none")
OFFLOAD_TIERS = tuple(label_value(t) for t in (Tier.DEVICE, Tier.HOST, Tier.DISK))
HITS = ("true", "false")

F = TypeVar("F", CounterFamily, HistogramFamily)
RESULTS = ("hit", "waited", "failed")


class _Twice(Generic[F]):
    """One figure, per model and for the node; `domains`: every value of
    each label but `model`, the node's series made at 0 from them."""

    family: type[F]

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        domains: Sequence[Iterable[str]],
    ) -> None:
        self.model: F = self.family(f"torpor_{name}", documentation, ["model", *labels])
        self.node: F = self.family(
            f"torpor_node_{name}", f"{documentation} Of every model.", list(labels)
        )
        for values in itertools.product(*domains):
            self.node.zero(*values)


class Histograms(_Twice[HistogramFamily]):
    family = HistogramFamily

    def observe(self, value: float, model_id: str, *labels: str) -> None:
        self.model.observe(value, model_id, *labels)
        self.node.observe(value, *labels)


class Counters(_Twice[CounterFamily]):
    family = CounterFamily

    def inc(self, model_id: str, *labels: str) -> None:
        self.model.inc(model_id, *labels)
        self.node.inc(*labels)


class Transitions:
    def __init__(self) -> None:
        self.load = Histograms(
            "load_duration_seconds",
            "A Load (cold start): from its start until the model was ready.",
            [],
            [],
        )
        self.wake = Histograms(
            "wake_duration_seconds",
            "A Wake, by the sleep level it woke from and the tier most bytes came from.",
            ["level", "source"],
            [LEVELS, SOURCES],
        )
        self.wake_first_layer = Histograms(
            "wake_first_layer_seconds",
            "From the start of a Wake until its first layer was on the device.",
            ["level", "source"],
            [LEVELS, SOURCES],
        )
        self.sleep = Histograms(
            "sleep_duration_seconds",
            "A Sleep, by the level it went to.",
            ["level"],
            [LEVELS[1:]],
        )
        self.offload = Histograms(
            "offload_duration_seconds",
            "An Offload, by the tier its layers went to.",
            ["tier"],
            [OFFLOAD_TIERS],
        )
        self.acquire_ready = Histograms(
            "acquire_ready_seconds",
            'An Acquire, from its arrival until the model was ready; hit="true" when'
            " nothing had to move.",
            ["hit"],
            [HITS],
        )
        self.transitions = Counters(
            "transitions",
            "Transitions that ended, by kind, outcome and cause.",
            ["kind", "outcome", "cause"],
            [[label_value(v) for v in enum] for enum in (TransitionKind, Outcome, Cause)],
        )
        self.acquires = Counters(
            "acquires",
            "Acquires that ended: hit (ready at once), waited (made ready), failed.",
            ["result"],
            [RESULTS],
        )
        twice = (
            self.load,
            self.wake,
            self.wake_first_layer,
            self.sleep,
            self.offload,
            self.acquire_ready,
            self.transitions,
            self.acquires,
        )
        self.families = tuple(t.model for t in twice)
        self.node_families = tuple(t.node for t in twice)

    # -- the listeners (on the event loop's thread) -------------------------------

    def finished(self, f: Finished) -> None:
        record, model = f.record, f.model_id
        self.transitions.inc(
            model, label_value(record.kind), label_value(record.outcome), label_value(record.cause)
        )
        if record.outcome is not Outcome.SUCCEEDED:
            return
        seconds = record.duration
        if record.kind is TransitionKind.LOAD:
            self.load.observe(seconds, model)
        elif record.kind is TransitionKind.WAKE:
            level, source = str(f.level), label_value(f.source) if f.source else "none"
            self.wake.observe(seconds, model, level, source)
            if f.first_layer is not None:
                self.wake_first_layer.observe(f.first_layer, model, level, source)
        elif record.kind is TransitionKind.SLEEP:
            self.sleep.observe(seconds, model, str(f.level))
        elif record.kind is TransitionKind.OFFLOAD and f.target is not None:
            self.offload.observe(seconds, model, label_value(f.target))

    def acquired(self, figure: Figure, ready: bool) -> None:
        result = "failed" if not ready else "hit" if figure.hit else "waited"
        self.acquires.inc(figure.model_id, result)
        if ready:
            self.acquire_ready.observe(figure.seconds, figure.model_id, label_value(figure.hit))

    # -- the registry's collector ------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        for family in (*self.families, *self.node_families):
            yield family.collect()

    def frozen(self) -> list[CounterFamily | HistogramFamily]:
        """Copies of the families as they are now (cheap: their counts only)."""
        return [family.frozen() for family in (*self.families, *self.node_families)]

    def models(self) -> set[str]:
        return {model for family in self.families for model in family.models()}

    def forget(self, model_ids: set[str]) -> None:
        for family in self.families:
            family.forget(model_ids)
