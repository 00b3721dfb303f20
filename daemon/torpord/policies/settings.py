"""What policies are told: each model's policy, and the node-wide settings.

Frozen, validated where they are built (config and the API check ranges and
name the field; these constructors only assert the invariants).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from torpord.types import Tier

__all__ = ["EvictionOrder", "Granularity", "ModelPolicy", "PolicySettings", "Window"]


class EvictionOrder(enum.Enum):
    """Which model goes first when memory is needed."""

    COST = "cost"  # the default: keep what is expensive to bring back and likely used soon
    LRU = "lru"  # least recently used first
    LFU = "lfu"  # least frequently used first


class Granularity(enum.Enum):
    MODEL = "model"  # evict whole models
    LAYERS = "layers"  # evict just enough layers (last layers first)


@dataclass(frozen=True)
class Window:
    """A weekly time window in which a model is wanted: it is warmed to
    `tier` `lead` seconds before the window opens, and kept warm through it.
    `start`/`end` are seconds since Monday 00:00 UTC (0 ≤ start < 604800;
    end may wrap past the week's end, i.e. end < start)."""

    start: float
    end: float
    tier: Tier = Tier.HOST  # HOST (warm) or DEVICE (ready)
    lead: float = 300.0


@dataclass(frozen=True)
class ModelPolicy:
    """One model's policy (set at Load or in the catalogue; config has the defaults)."""

    idle_timeout: float = 0.0  # seconds without use before it sleeps; 0 = never
    idle_level: int = 1  # the sleep level an idle model goes to (1 or 2)
    priority: int = 0  # higher is kept longer; compared before the eviction order
    pinned: bool = False  # never evicted, never put to sleep by a policy
    # Where an evicted model goes: HOST (level-1 sleep; with no host room,
    # level 2 with a disk copy where the disk cache is faster than the
    # source and has room, room.py), DISK (level-2 sleep with a disk copy),
    # SOURCE (level-2 sleep, reloaded from its source).
    evict_to: Tier = Tier.HOST
    windows: tuple[Window, ...] = ()


@dataclass(frozen=True)
class PolicySettings:
    """Node-wide settings (config `[policy]`)."""

    enabled: bool = True  # off: the daemon only ever does what callers ask
    eviction: EvictionOrder = EvictionOrder.COST
    granularity: Granularity = Granularity.MODEL
    max_sleeping_models: int = 0  # level-1 sleepers kept in host memory; 0 = no limit
    host_limit: int = 0  # bytes of host memory sleepers may hold; 0 = the pool's capacity
    preload: bool = True  # warm models predicted to be wanted, into free memory
    # Catalogue entries and level-2 sleepers expected to be used at least this
    # often in the next hour are preloaded to the host (predict.py; one stray
    # use an hour ago reads ~0.5).
    preload_min_uses: float = 1.0
    # Acquire reads a model from its source or disk copy into host memory
    # before making room for it on the device (stage.py).
    staging: bool = True
    default: ModelPolicy = field(default_factory=ModelPolicy)
