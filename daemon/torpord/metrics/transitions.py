"""What happened, as it happened: the transitions' histograms and counts
(from the manager's history) and the Acquires' (from its Acquire listener).

Durations are observed for SUCCEEDED transitions only (a rolled-back wake's
time says nothing about how long wakes take); every outcome is counted in
`torpor_transitions_total`. Each is counted twice: in the model's series
and in the node's (`torpor_node_*`, metrics/node.py), which never go.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric

from torpord.core.acquire import Figure
from torpord.core.history import Finished
from torpord.metrics.node import NodeFamilies
from torpord.metrics.series import CounterFamily, HistogramFamily, label_value
from torpord.types import Outcome, TransitionKind

__all__ = ["Transitions"]


class Transitions:
    def __init__(self) -> None:
        self.load = HistogramFamily(
            "torpor_load_duration_seconds",
            "A Load (cold start): from its start until the model was ready.",
            ["model"],
        )
        self.wake = HistogramFamily(
            "torpor_wake_duration_seconds",
            "A Wake, by the sleep level it woke from and the tier most bytes came from.",
            ["model", "level", "source"],
        )
        self.wake_first_layer = HistogramFamily(
            "torpor_wake_first_layer_seconds",
            "From the start of a Wake until its first layer was on the device.",
            ["model", "level", "source"],
        )
        self.sleep = HistogramFamily(
            "torpor_sleep_duration_seconds",
            "A Sleep, by the level it went to.",
            ["model", "level"],
        )
        self.offload = HistogramFamily(
            "torpor_offload_duration_seconds",
            "An Offload, by the tier its layers went to.",
            ["model", "tier"],
        )
        self.acquire_ready = HistogramFamily(
            "torpor_acquire_ready_seconds",
            'An Acquire, from its arrival until the model was ready; hit="true" when'
            " nothing had to move.",
            ["model", "hit"],
        )
        self.transitions = CounterFamily(
            "torpor_transitions",
            "Transitions that ended, by kind, outcome and cause.",
            ["model", "kind", "outcome", "cause"],
        )
        self.acquires = CounterFamily(
            "torpor_acquires",
            "Acquires that ended: hit (ready at once), waited (made ready), failed.",
            ["model", "result"],
        )
        self.families = (
            self.load,
            self.wake,
            self.wake_first_layer,
            self.sleep,
            self.offload,
            self.acquire_ready,
            self.transitions,
            self.acquires,
        )
        self.node = NodeFamilies()

    # -- the listeners (on the event loop's thread) -------------------------------

    def finished(self, f: Finished) -> None:
        record, model, node = f.record, f.model_id, self.node
        labels = (label_value(record.kind), label_value(record.outcome), label_value(record.cause))
        self.transitions.inc(model, *labels)
        node.transitions.inc(*labels)
        if record.outcome is not Outcome.SUCCEEDED:
            return
        seconds = record.duration
        if record.kind is TransitionKind.LOAD:
            self.load.observe(seconds, model)
            node.load.observe(seconds)
        elif record.kind is TransitionKind.WAKE:
            level, source = str(f.level), label_value(f.source) if f.source else "none"
            self.wake.observe(seconds, model, level, source)
            node.wake.observe(seconds, level, source)
            if f.first_layer is not None:
                self.wake_first_layer.observe(f.first_layer, model, level, source)
                node.wake_first_layer.observe(f.first_layer, level, source)
        elif record.kind is TransitionKind.SLEEP:
            self.sleep.observe(seconds, model, str(f.level))
            node.sleep.observe(seconds, str(f.level))
        elif record.kind is TransitionKind.OFFLOAD and f.target is not None:
            self.offload.observe(seconds, model, label_value(f.target))
            node.offload.observe(seconds, label_value(f.target))

    def acquired(self, figure: Figure, ready: bool) -> None:
        result = "failed" if not ready else "hit" if figure.hit else "waited"
        self.acquires.inc(figure.model_id, result)
        self.node.acquires.inc(result)
        if ready:
            self.acquire_ready.observe(figure.seconds, figure.model_id, label_value(figure.hit))
            self.node.acquire_ready.observe(figure.seconds, label_value(figure.hit))

    # -- the registry's collector ------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        for family in (*self.families, *self.node.families):
            yield family.collect()

    def frozen(self) -> list[CounterFamily | HistogramFamily]:
        """Copies of the families as they are now (cheap: their counts only)."""
        return [family.frozen() for family in (*self.families, *self.node.families)]

    def models(self) -> set[str]:
        return {model for family in self.families for model in family.models()}

    def forget(self, model_ids: set[str]) -> None:
        for family in self.families:
            family.forget(model_ids)
