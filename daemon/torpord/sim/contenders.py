"""The policies a run compares: Torpor's default and three references.

All run the same decision code (`torpord.policies.decide`) with different
settings, and all but the last on the same node (equal device and host
memory):

- `torpor`: PolicySettings() (cost-aware eviction to host, preloading) with
  an idle timeout of `TORPOR_IDLE_TIMEOUT` (see there).
The baselines' settings are torpord.policies.baselines':

- `keep-alive`: Ollama's: a model is unloaded after 5 minutes without use
  and the least recently used one is unloaded when room is needed; nothing
  is kept in host memory, every miss loads from the source.
- `lru-sleep`: llm-d's fast model actuation (vLLM sleep mode driven by a
  launcher): the least recently used model is put to sleep (level 1, in
  host memory) when room is needed, the least recently used sleepers
  dropped when the host is full; no idle timeout, no preloading.
- `no-oversub`: no oversubscription: a device big enough for every model,
  all loaded from the start; every request is a hit. Its GPU memory·time
  is the reference the others save against.
"""

from __future__ import annotations

from dataclasses import dataclass

from torpord.policies.baselines import keep_alive, lru_sleep
from torpord.policies.settings import ModelPolicy, PolicySettings
from torpord.types import Tier

__all__ = ["TORPOR_IDLE_TIMEOUT", "Contender", "contenders"]

# Torpor's idle timeout: how long a model stays on the device unused before
# it sleeps to the host. Sleeping an idle model costs nobody any waiting (it
# runs between requests, on the device→host link) and leaves free device
# memory, so that the next miss wakes at once instead of first waiting for an
# eviction, and preloading has room. Ten minutes keeps a burst's models
# resident through the pauses inside the burst (the generator's bursts last
# 5-10 minutes), while a tail model used once is gone well before the next
# ones need the room. (`torpord-sim run --idle-timeout` tries others.)
TORPOR_IDLE_TIMEOUT = 600.0


@dataclass(frozen=True)
class Contender:
    name: str
    settings: PolicySettings
    load_everything: bool = False  # True: the device holds every model (no-oversub)


def torpor(idle_timeout: float = TORPOR_IDLE_TIMEOUT) -> PolicySettings:
    return PolicySettings(default=ModelPolicy(idle_timeout=idle_timeout, evict_to=Tier.HOST))


def no_oversubscription() -> PolicySettings:
    return PolicySettings(preload=False, default=ModelPolicy(idle_timeout=0.0))


def contenders(idle_timeout: float = TORPOR_IDLE_TIMEOUT) -> tuple[Contender, ...]:
    return (
        Contender("torpor", torpor(idle_timeout)),
        Contender("keep-alive", keep_alive()),
        Contender("lru-sleep", lru_sleep()),
        Contender("no-oversub", no_oversubscription(), load_everything=True),
    )
