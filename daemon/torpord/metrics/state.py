"""The daemon's state at scrape time: memory by tier, models by state, each
model's residency and engines, build info, and the counts the core keeps
(torpord.core.counters) and the scrubber's.

Read from live core objects: collect() runs on the event loop's thread only
(the HTTP server's handler calls it there).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from torpord import __version__
from torpord.backends.base import PoolInfo
from torpord.core.manager import ModelManager
from torpord.metrics.series import label_value
from torpord.types import ModelState, Tier

__all__ = ["State"]


class Scrubber(Protocol):
    """What the metrics read of the scrubber (torpord.core.scrubber)."""

    checked_bytes: dict[Tier, int]
    corrupt: dict[Tier, int]


class State:
    def __init__(self, manager: ModelManager) -> None:
        self._m = manager

    def collect(self) -> Iterator[Metric]:
        yield from self._memory()
        yield from self._models()
        yield from self._counts()
        info = GaugeMetricFamily(
            "torpor_build_info",
            "Always 1: the daemon's version and backend.",
            labels=["version", "backend"],
        )
        info.add_metric([__version__, self._m.backend.kind], 1)
        yield info

    def _memory(self) -> Iterator[Metric]:
        labels = ["tier", "device"]
        capacity = GaugeMetricFamily(
            "torpor_memory_capacity_bytes", "The budget of each memory tier.", labels=labels
        )
        used = GaugeMetricFamily(
            "torpor_memory_used_bytes", "Bytes of each memory tier in use.", labels=labels
        )
        held = GaugeMetricFamily(
            "torpor_memory_held_bytes",
            "Of the used bytes: freed memory engines that were revoked may still map.",
            labels=labels,
        )
        pools: list[tuple[str, str, PoolInfo]] = [
            ("device", d.uuid, d.pool) for d in self._m.backend.devices()
        ]
        pools.append(("host", "", self._m.backend.host_pool()))
        for tier, device, pool in pools:
            capacity.add_metric([tier, device], pool.capacity)
            used.add_metric([tier, device], pool.used)
            held.add_metric([tier, device], pool.held)
        disk = self._m.disk
        if disk is not None:
            capacity.add_metric(["disk", ""], disk.capacity)
            used.add_metric(["disk", ""], disk.used)
            held.add_metric(["disk", ""], 0)
        yield from (capacity, used, held)

    def _models(self) -> Iterator[Metric]:
        models = list(self._m.registry.models.values())
        by_state = dict.fromkeys(ModelState, 0)
        for model in models:
            by_state[model.state] += 1
        # Catalogue entries not loaded: what ListModels shows as UNLOADED.
        by_state[ModelState.UNLOADED] += sum(
            1 for e in self._m.catalogue.entries() if e.model_id not in self._m.registry.models
        )
        states = GaugeMetricFamily(
            "torpor_models",
            "Models by state (catalogue entries not loaded count as unloaded).",
            labels=["state"],
        )
        for state, count in by_state.items():
            states.add_metric([label_value(state)], count)
        yield states
        resident = GaugeMetricFamily(
            "torpor_model_resident_bytes",
            "Each model's bytes in device and host memory, and in disk copies.",
            labels=["model", "tier"],
        )
        engines = GaugeMetricFamily(
            "torpor_engines_attached", "Engines attached to each model.", labels=["model"]
        )
        for model in sorted(models, key=lambda m: m.model_id):
            sizes = {"device": 0, "host": 0, "disk": 0}
            for layer in model.layers:
                if layer.slab is not None and layer.slab.tier in (Tier.DEVICE, Tier.HOST):
                    sizes[label_value(layer.slab.tier)] += layer.plan.size
                if layer.disk is not None:  # (a copy on disk, whether in memory too or not)
                    sizes["disk"] += layer.plan.size
            for tier, size in sizes.items():
                resident.add_metric([model.model_id, tier], size)
            engines.add_metric([model.model_id], model.engines)
        yield from (resident, engines)

    def _counts(self) -> Iterator[Metric]:
        c = self._m.counters
        moved = CounterMetricFamily(
            "torpor_moved_bytes", "Bytes moved between tiers, by path.", labels=["path"]
        )
        for path, size in sorted(c.moved.items()):
            moved.add_metric([path], size)
        yield moved
        scrubber: Scrubber | None = getattr(self._m, "scrubber", None)
        checked = dict(scrubber.checked_bytes) if scrubber is not None else {}
        corrupt = dict(scrubber.corrupt) if scrubber is not None else {}
        failures = CounterMetricFamily(
            "torpor_checksum_failures",
            "Copies that did not match their checksum when read or scrubbed, by their tier.",
            labels=["tier"],
        )
        for tier in (Tier.SOURCE, Tier.DISK, Tier.HOST, Tier.DEVICE):
            failures.add_metric(
                [label_value(tier)], c.checksum_failures.get(tier, 0) + corrupt.get(tier, 0)
            )
        yield failures
        scrubbed = CounterMetricFamily(
            "torpor_scrub_bytes", "Bytes of sleeping copies the scrubber checked.", labels=["tier"]
        )
        found = CounterMetricFamily(
            "torpor_scrub_corrupt", "Copies the scrubber found corrupt.", labels=["tier"]
        )
        for tier in (Tier.HOST, Tier.DISK):
            scrubbed.add_metric([label_value(tier)], checked.get(tier, 0))
            found.add_metric([label_value(tier)], corrupt.get(tier, 0))
        yield from (scrubbed, found)
        per_model = (
            ("torpor_quiesce_timeouts", "Engines that did not let go in time.", c.quiesce_timeouts),
            (
                "torpor_engines_revoked",
                "Engines detached by the daemon (not by an unload or a shutdown).",
                c.engines_revoked,
            ),
            ("torpor_engine_attaches", "Engines that attached.", c.engine_attaches),
            (
                "torpor_engine_detaches",
                "Engines that detached, or were detached.",
                c.engine_detaches,
            ),
        )
        for name, doc, counts in per_model:
            family = CounterMetricFamily(name, doc, labels=["model"])
            for model_id, count in sorted(counts.items()):
                family.add_metric([model_id], count)
            yield family
