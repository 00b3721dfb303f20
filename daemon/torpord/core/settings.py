"""What the manager is told at start: where sources may be, how to plan and
read them, the policies' settings and the catalogue's entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torpord.core.catalogue import Entry
from torpord.policies.settings import PolicySettings
from torpord.storage.layers import DEFAULT_LAYER_PATTERNS, LayerPatterns
from torpord.storage.pipeline import ReadOptions

__all__ = ["ManagerSettings"]


@dataclass(frozen=True)
class ManagerSettings:
    allowed_roots: tuple[Path, ...]
    patterns: LayerPatterns = DEFAULT_LAYER_PATTERNS
    alignment: int = 256
    worker_threads: int = 4
    read: ReadOptions = field(default_factory=ReadOptions)
    # Config [policy] (and [policy.default] in policy.default).
    policy: PolicySettings = field(default_factory=PolicySettings)
    policy_interval: float = 1.0  # seconds between two rounds of housekeeping
    # Seconds an Acquire waits for models in use or in a transition to be
    # let go of (config [policy] acquire_patience).
    acquire_patience: float = 5.0
    # Seconds a model an Acquire made ready stays held in use (config
    # [policy] acquire_hold), unless its engine or router reports a use first.
    acquire_hold: float = 10.0
    # Config [[catalogue]]: entries the catalogue starts with.
    catalogue: tuple[Entry, ...] = ()
    # Config [scrub]: bytes a second the scrubber checks (0: no scrubber),
    # and the seconds from a clean check of a copy to the next.
    scrub_rate: int = 0
    scrub_interval: float = 3600.0
