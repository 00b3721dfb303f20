"""Which model goes first: the eviction orders, and how likely a model is used.

Every order compares priority first (lower goes first), then:

- LRU: the least recently used (the later of its last use and the time it
  entered its state, so a model just loaded or woken counts as fresh);
- LFU: the fewest uses since it was first seen, then LRU;
- COST (the default): the lowest expected seconds of waiting caused per
  byte freed, `expected uses * (seconds to bring it back from where it
  would go - seconds from where it is now) / bytes freed`: the issue's
  bytes * time * predicted use, taken per byte freed, since making room is
  choosing which bytes to free, so the cheapest bytes go first (and the
  time of a whole model scales with its bytes, so a bigger model is not
  kept just for being big). Evicting to HOST is cheap (host → device is
  fast), to SOURCE dear; a model predicted to be used soon is kept.
  Among equal scores the larger goes first (fewer evictions), then by id.

Every key ends with the model id, so the order is total and a view always
gives the same answer.
"""

from __future__ import annotations

from torpord.policies.predict import expected_uses
from torpord.policies.schedule import warm_window
from torpord.policies.settings import EvictionOrder
from torpord.policies.view import ModelView, NodeView
from torpord.types import Tier

__all__ = ["WINDOW_USES", "Key", "eviction_key", "likelihood", "recency"]

# A model whose time window is warm is expected to be used at least this
# often, whatever its history says: it was scheduled for a reason.
WINDOW_USES = 1.0

Key = tuple[float, float, float, str]


def likelihood(view: NodeView, model: ModelView) -> float:
    """Expected uses of `model` in the prediction horizon (predict.py),
    raised to WINDOW_USES while one of its windows is warm."""
    uses = expected_uses(model.activity, view.now)
    if warm_window(model.policy, view.now) is not None:
        uses = max(uses, WINDOW_USES)
    return uses


def recency(model: ModelView) -> float:
    """When the model was last used, or entered its state if later."""
    return max(model.activity.last_use, model.since)


def eviction_key(
    view: NodeView,
    model: ModelView,
    *,
    freed: int,
    back: int,
    now_tier: Tier,
    to_tier: Tier,
) -> Key:
    """The sort key of evicting `model` (lowest first): it frees `freed`
    bytes and moves `back` bytes from `now_tier` to `to_tier`, from where
    they must come back to the device when it is used again."""
    priority = float(model.policy.priority)
    order = view.settings.eviction
    if order is EvictionOrder.LRU:
        return (priority, recency(model), 0.0, model.model_id)
    if order is EvictionOrder.LFU:
        return (priority, float(model.activity.uses), recency(model), model.model_id)
    bandwidth = view.bandwidth
    extra = bandwidth.seconds_to_device(to_tier, back) - bandwidth.seconds_to_device(now_tier, back)
    score = likelihood(view, model) * max(extra, 0.0) / max(freed, 1)
    return (priority, score, -float(freed), model.model_id)
