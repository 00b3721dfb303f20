"""Plain counters the core keeps for the metrics (torpord.metrics reads them
at scrape time): bytes moved by path, checksum failures by tier, and what
happened to engines, per model. Only ever incremented, on the event loop's
thread; no Prometheus here.

Per-model counts of models the daemon no longer knows are dropped when the
count of models kept grows past `KEEP_MODELS`, so ids that come and go can't
grow them without end: a backstop, since the metrics drop a gone model's
series (and these counts) `[metrics] keep_unloaded` after a scrape first
found it gone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torpord.types import Tier

__all__ = ["KEEP_MODELS", "Counters"]

# Models whose per-model counts are kept before those of unknown ids go.
KEEP_MODELS = 1024


def _always(model_id: str) -> bool:
    return True


@dataclass
class Counters:
    # Whether the daemon still knows a model id (loaded or in the catalogue).
    known: Callable[[str], bool] = _always
    # "source_to_host", "host_to_device", ... -> bytes that arrived there.
    moved: dict[str, int] = field(default_factory=dict)
    # Copies that did not match their checksum when read, by where they were.
    checksum_failures: dict[Tier, int] = field(default_factory=dict)
    # Per model id:
    quiesce_timeouts: dict[str, int] = field(default_factory=dict)
    engines_revoked: dict[str, int] = field(default_factory=dict)
    engine_attaches: dict[str, int] = field(default_factory=dict)
    engine_detaches: dict[str, int] = field(default_factory=dict)

    def moved_bytes(self, source: Tier, target: Tier, size: int) -> None:
        path = f"{source.value.lower()}_to_{target.value.lower()}"
        self.moved[path] = self.moved.get(path, 0) + size

    def checksum_failed(self, tier: Tier) -> None:
        self.checksum_failures[tier] = self.checksum_failures.get(tier, 0) + 1

    def attached(self, model_id: str) -> None:
        self._count(self.engine_attaches, model_id)

    def detached(self, model_id: str) -> None:
        self._count(self.engine_detaches, model_id)

    def revoked(self, model_id: str) -> None:
        self._count(self.engines_revoked, model_id)

    def quiesce_timed_out(self, model_id: str) -> None:
        self._count(self.quiesce_timeouts, model_id)

    def _count(self, per_model: dict[str, int], model_id: str) -> None:
        if model_id not in per_model and len(self.models()) >= KEEP_MODELS:
            for gone in [m for m in self.models() if not self.known(m)]:
                self.forget(gone)
        per_model[model_id] = per_model.get(model_id, 0) + 1

    def models(self) -> set[str]:
        """The model ids some per-model count is kept for."""
        return {
            model_id
            for counts in self._per_model()
            for model_id in counts  # (small: one entry per model with engines)
        }

    def forget(self, model_id: str) -> None:
        """Drop `model_id`'s per-model counts (it is gone for good)."""
        for counts in self._per_model():
            counts.pop(model_id, None)

    def _per_model(self) -> tuple[dict[str, int], ...]:
        return (
            self.quiesce_timeouts,
            self.engines_revoked,
            self.engine_attaches,
            self.engine_detaches,
        )
