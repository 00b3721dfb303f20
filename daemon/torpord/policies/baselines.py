"""Other systems' policies, as settings of this very code.

The simulator compares Torpor's default (`PolicySettings()`: cost-aware
eviction to HOST, preloading) with these, run by the same decisions so
that only the policy differs:

- `keep_alive()`: Ollama's keep-alive. A model unused for 5 minutes is
  unloaded (a level-2 sleep: its weights are dropped and read again from
  the source when wanted, which is what a reload costs), and a model that
  does not fit unloads the least recently used ones (LRU, to SOURCE). No
  host tier, no preloading, no staging (a model is read straight to the GPU).
- `lru_sleep()`: sleep instead of unload, as llm-d's FMA-like setups do:
  no idle timeout; a model that does not fit puts the least recently used
  ones to sleep at level 1 (to HOST), and a full host pushes its least
  recently used sleepers down to level 2. No preloading, no staging (vLLM's
  wake from level 2 reloads the weights straight into GPU memory).

(An image has no source to reload from: these send it to the disk copy
or the host, as every policy here does.)
"""

from __future__ import annotations

from torpord.policies.settings import EvictionOrder, Granularity, ModelPolicy, PolicySettings
from torpord.types import Tier

__all__ = ["KEEP_ALIVE_SECONDS", "keep_alive", "lru_sleep"]

KEEP_ALIVE_SECONDS = 300.0  # Ollama's OLLAMA_KEEP_ALIVE default (5m)


def keep_alive(seconds: float = KEEP_ALIVE_SECONDS) -> PolicySettings:
    """Ollama: unload after `seconds` idle; unload the LRU model to make room."""
    return PolicySettings(
        eviction=EvictionOrder.LRU,
        granularity=Granularity.MODEL,
        preload=False,
        staging=False,
        default=ModelPolicy(idle_timeout=seconds, idle_level=2, evict_to=Tier.SOURCE),
    )


def lru_sleep() -> PolicySettings:
    """Sleep the LRU model to HOST to make room; no idle timeout."""
    return PolicySettings(
        eviction=EvictionOrder.LRU,
        granularity=Granularity.MODEL,
        preload=False,
        staging=False,
        default=ModelPolicy(idle_timeout=0.0, idle_level=1, evict_to=Tier.HOST),
    )
