"""Holding back a model whose policy action failed.

A housekeeping action that fails (a Load whose source is gone, a Sleep an
engine refused, one a caller preempted) would be decided again at the next
round, a second later, and fail the same way for as long as its cause
lasts: each try logged, a Load re-validating its checkpoint each time.
So the model is held back from housekeeping for a while instead, twice
as long after each failure in a row (from two rounds up to MAX_WAIT), and
forgotten at its first success, once it is gone from the node (unloaded,
deregistered), or when a hold has long run out (a failure days later
starts from two rounds again). Held back means the housekeeping view
shows it busy: no action for it, and no eviction of it to make room for
another. A caller's calls, and the room made for them, are not held back.
"""

from __future__ import annotations

from dataclasses import replace

from torpord.policies.view import NodeView

__all__ = ["MAX_WAIT", "Backoff"]

MAX_WAIT = 300.0  # seconds: the longest a failing model is held back


class Backoff:
    def __init__(self, interval: float) -> None:
        """`interval`: the seconds between two rounds of housekeeping."""
        self._interval = interval
        self._held: dict[str, tuple[int, float]] = {}  # model id -> (failures, until)

    def failed(self, model_id: str, now: float) -> float:
        """An action for `model_id` failed at `now`: the seconds it is held back."""
        failures, until = self._held.get(model_id, (0, 0.0))
        if now > until + MAX_WAIT:  # (a streak long over: not in a row any more)
            failures = 0
        failures += 1
        wait: float = min(MAX_WAIT, self._interval * 2.0**failures)
        self._held[model_id] = (failures, now + wait)
        return wait

    def succeeded(self, model_id: str) -> None:
        self._held.pop(model_id, None)

    def held(self, now: float) -> set[str]:
        """The models held back at `now`."""
        return {model_id for model_id, (_, until) in self._held.items() if until > now}

    def hold_back(self, view: NodeView, now: float) -> NodeView:
        """`view` with the models held back at `now` shown busy; the records
        of models no longer on the node are let go of (so they are bounded
        by the models the node has)."""
        present = {model.model_id for model in view.models}
        for model_id in [m for m in self._held if m not in present]:
            del self._held[model_id]
        held = self.held(now)
        if not held:
            return view
        models = tuple(replace(m, busy=True) if m.model_id in held else m for m in view.models)
        return replace(view, models=models)
