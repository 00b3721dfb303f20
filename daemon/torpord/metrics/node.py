"""The node's transition and Acquire metrics: the per-model ones summed over
models, `torpor_node_*`, without a `model` label.

A per-model series appears at its model's first event, with 1, and goes
when the model does; Prometheus counts no increase at a series' first
sample, so rate() and increase() over models miss the first load of each,
and every load of a model that comes and goes. These series exist from the
daemon's start, at 0, for every value of their labels (all bounded), and
are never dropped: node-wide rates and quantiles (switch rate, cold-start
and wake P99) are queried on them.
"""

from __future__ import annotations

import itertools

from torpord.metrics.series import CounterFamily, HistogramFamily, label_value
from torpord.types import Cause, Outcome, Tier, TransitionKind

__all__ = ["LEVELS", "SOURCES", "NodeFamilies"]

# A sleep's level (1, 2); a wake's also 0: a wake of an OFFLOADED model.
LEVELS = ("0", "1", "2")
# The tier most of a wake's bytes came from; "none" when none moved.
SOURCES = (*(label_value(t) for t in (Tier.HOST, Tier.DISK, Tier.SOURCE)), "none")
OFFLOAD_TIERS = tuple(label_value(t) for t in (Tier.DEVICE, Tier.HOST, Tier.DISK))


class NodeFamilies:
    def __init__(self) -> None:
        self.load = HistogramFamily(
            "torpor_node_load_duration_seconds",
            "Loads (cold starts) of every model: from the start until the model was ready.",
            [],
        )
        self.wake = HistogramFamily(
            "torpor_node_wake_duration_seconds",
            "Wakes of every model, by the sleep level woken from and the tier most bytes"
            " came from.",
            ["level", "source"],
        )
        self.wake_first_layer = HistogramFamily(
            "torpor_node_wake_first_layer_seconds",
            "Wakes of every model: from the start until the first layer was on the device.",
            ["level", "source"],
        )
        self.sleep = HistogramFamily(
            "torpor_node_sleep_duration_seconds",
            "Sleeps of every model, by the level gone to.",
            ["level"],
        )
        self.offload = HistogramFamily(
            "torpor_node_offload_duration_seconds",
            "Offloads of every model, by the tier the layers went to.",
            ["tier"],
        )
        self.acquire_ready = HistogramFamily(
            "torpor_node_acquire_ready_seconds",
            'Acquires of every model, from arrival until ready; hit="true" when nothing'
            " had to move.",
            ["hit"],
        )
        self.transitions = CounterFamily(
            "torpor_node_transitions",
            "Transitions of every model that ended, by kind, outcome and cause.",
            ["kind", "outcome", "cause"],
        )
        self.acquires = CounterFamily(
            "torpor_node_acquires",
            "Acquires of every model that ended: hit, waited (made ready), failed.",
            ["result"],
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
        self.load.zero()
        for level, source in itertools.product(LEVELS, SOURCES):
            self.wake.zero(level, source)
            self.wake_first_layer.zero(level, source)
        for level in LEVELS[1:]:
            self.sleep.zero(level)
        for tier in OFFLOAD_TIERS:
            self.offload.zero(tier)
        for hit in ("true", "false"):
            self.acquire_ready.zero(hit)
        for kind, outcome, cause in itertools.product(TransitionKind, Outcome, Cause):
            self.transitions.zero(label_value(kind), label_value(outcome), label_value(cause))
        for result in ("hit", "waited", "failed"):
            self.acquires.zero(result)
