"""The discrete-event simulation: a trace replayed against the real policies.

At each request's arrival the model's activity records the Acquire (one
use, reporter "acquire", as the daemon does); a ready model (ACTIVE, every
layer on the device, no transition) is a hit. Otherwise the request joins
the model's running transition (concurrent requests share one), or the
engine asks `decisions.acquire(view, model)` and commits its actions in
order: each starts when the one before it is done and its link (the path's
bottleneck: source reads, disk, host→device, device→host) is free, and
takes bytes / bandwidth. When the model is ready its waiters start; each
request then holds the model (in_use, reporter "sim") for its duration.
A Refusal parks the request until memory frees (a transition ends or a
request does), then it asks again. Every `tick` simulated seconds the
engine runs `decisions.housekeeping(view)` and commits what it returns.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torpord.policies.actions import Action, Load, Offload, Refusal, Sleep, Unload, Wake
from torpord.policies.settings import PolicySettings
from torpord.policies.view import NodeView
from torpord.sim.node import ActivityLike, PolicyViolation, SimModel, SimNode, Transfer
from torpord.sim.spec import NodeSpec
from torpord.sim.trace import Request
from torpord.types import Cause, Tier

__all__ = ["Decisions", "Outcome", "simulate"]

# Event kinds, in the order they run at one instant: what frees memory
# first, then what asks for it.
_DONE, _END, _ARRIVAL, _TICK = 0, 1, 2, 3


class Decisions(Protocol):
    """What the engine calls: torpord.policies.decide is one."""

    def acquire(self, view: NodeView, model_id: str) -> Sequence[Action] | Refusal: ...

    def housekeeping(self, view: NodeView) -> Sequence[Action]: ...


@dataclass
class Outcome:
    """What one policy did with one trace."""

    name: str
    requests: int = 0
    hits: int = 0
    ready: list[float] = field(default_factory=list)  # each served request's time-to-ready
    loads: int = 0
    wakes: int = 0  # Wake, and Offload to DEVICE
    evictions: int = 0  # off the device to make room (not IDLE)
    idle_sleeps: int = 0
    preloads: int = 0  # actions caused by PRELOAD or SCHEDULE
    demotions: int = 0  # sleepers pushed further down (host → level 2)
    refusals: int = 0  # Refusals answered to an Acquire
    unserved: int = 0  # requests still waiting when the trace ran out
    device_byte_seconds: float = 0.0  # ∫ device memory used dt
    device_capacity: int = 0
    seconds: float = 0.0  # simulated time, first arrival to last event


class _Run:
    def __init__(
        self,
        name: str,
        spec: NodeSpec,
        requests: Sequence[Request],
        settings: PolicySettings,
        decisions: Decisions,
        activity: Callable[[], ActivityLike],
        tick: float,
        load_everything: bool,
    ) -> None:
        self.node = SimNode(spec, settings, activity)
        if load_everything:
            self.node.load_everything()
        self.start = spec.start
        self.requests = requests
        self.decisions = decisions
        self.tick = tick
        self.out = Outcome(name, requests=len(requests), device_capacity=spec.device)
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.links: dict[str, float] = {}
        self.refused: dict[str, list[int]] = {}
        self.now = spec.start
        self.arrived = 0

    def push(self, at: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, kind, self.seq, payload))

    def run(self) -> Outcome:
        for i, r in enumerate(self.requests):
            self.push(self.start + r.arrival, _ARRIVAL, i)
        if self.requests:
            self.push(self.start + self.requests[0].arrival, _TICK, None)
        first = self.start + (self.requests[0].arrival if self.requests else 0.0)
        last = first
        device = self.node.used[Tier.DEVICE]
        while self.events:
            at, kind, _, payload = heapq.heappop(self.events)
            self.out.device_byte_seconds += device * (at - last)
            self.now = last = at
            if kind == _DONE:
                self.on_done(payload)  # type: ignore[arg-type]
            elif kind == _END:
                self.on_end(payload)  # type: ignore[arg-type]
            elif kind == _ARRIVAL:
                self.on_arrival(payload)  # type: ignore[arg-type]
            else:
                self.on_tick()
            device = self.node.used[Tier.DEVICE]
        self.out.seconds = last - first
        self.out.unserved = sum(len(v) for v in self.refused.values())
        return self.out

    # -- requests --------------------------------------------------------

    def on_arrival(self, i: int) -> None:
        r = self.requests[i]
        m = self.node.models[r.model_id]
        m.activity.record(self.now, "acquire", 1, 0.0, 0)
        self.arrived += 1
        if m.ready:
            self.out.hits += 1
            self.begin(m, i)
        elif m.pending:
            m.waiters.append(i)
        elif r.model_id in self.refused:
            self.refused[r.model_id].append(i)
        else:
            self.ask(m, [i])

    def ask(self, m: SimModel, waiting: list[int]) -> None:
        """Acquire `m` for the requests `waiting` (none of them started)."""
        answer = self.decisions.acquire(self.node.view(self.now), m.model_id)
        if isinstance(answer, Refusal):
            self.out.refusals += 1
            self.refused.setdefault(m.model_id, []).extend(waiting)
            return
        if not answer and not m.ready:
            raise PolicyViolation(f"acquire({m.model_id}) returned nothing; it is {m.state.value}")
        self.commit(answer)
        if m.ready:  # nothing to do after all
            for i in waiting:
                self.begin(m, i)
        elif not m.pending:
            raise PolicyViolation(f"acquire({m.model_id}) returned actions that leave it alone")
        else:
            m.waiters.extend(waiting)

    def begin(self, m: SimModel, i: int) -> None:
        r = self.requests[i]
        self.out.ready.append(self.now - (self.start + r.arrival))
        m.in_flight += 1
        m.activity.record(self.now, "sim", 0, 0.0, m.in_flight)
        self.push(self.now + r.duration, _END, i)

    def on_end(self, i: int) -> None:
        r = self.requests[i]
        m = self.node.models[r.model_id]
        m.in_flight -= 1
        m.activity.record(self.now, "sim", 1, r.duration, m.in_flight)
        if not m.in_flight:  # it may be evicted now: room for a refused one
            self.retry()

    def retry(self) -> None:
        """Ask again for the models whose Acquire was refused."""
        for model_id in list(self.refused):
            m = self.node.models[model_id]
            waiting = self.refused.pop(model_id)
            if m.pending:
                m.waiters.extend(waiting)
            elif m.ready:
                for i in waiting:
                    self.begin(m, i)
            else:
                self.ask(m, waiting)

    # -- transitions -----------------------------------------------------

    def commit(self, actions: Sequence[Action]) -> None:
        """Run `actions` one after another (each waits for the one before:
        an eviction frees what the wake after it fills)."""
        at = self.now
        for action in actions:
            m = self.node.models.get(action.model_id)
            before = m.bytes_in(Tier.DEVICE) if m is not None else 0
            transfer = self.node.commit(action)
            self.count(transfer, before)
            if transfer.seconds > 0:
                at = max(at, self.links.get(transfer.link, at))
                at += transfer.seconds
                self.links[transfer.link] = at
            self.push(at, _DONE, transfer)

    def count(self, t: Transfer, before: int) -> None:
        """Count `t`'s action; `before`: its model's device bytes before it."""
        a, out = t.action, self.out
        if a.cause in (Cause.PRELOAD, Cause.SCHEDULE):
            out.preloads += 1
        if isinstance(a, Load):
            out.loads += 1
        elif isinstance(a, Wake) or (isinstance(a, Offload) and a.tier is Tier.DEVICE):
            out.wakes += 1
        elif isinstance(a, Sleep | Offload | Unload):
            if a.cause is Cause.IDLE:
                out.idle_sleeps += 1
            elif before == 0:
                out.demotions += 1
            else:
                out.evictions += 1

    def on_done(self, t: Transfer) -> None:
        m = t.model
        self.node.done(t, self.now)
        if not m.pending and m.waiters:
            waiting, m.waiters = m.waiters, []
            if m.ready:
                for i in waiting:
                    self.begin(m, i)
            else:  # it was going elsewhere when they came: ask for it now
                self.ask(m, waiting)
        if not m.pending:  # no longer in transition: it may be evicted now
            self.retry()

    def on_tick(self) -> None:
        self.commit(self.decisions.housekeeping(self.node.view(self.now)))
        # Tick on while requests are still to come, run, or wait for a
        # transition; requests parked on a Refusal with nothing running and
        # nothing to come would wait for ever: they are counted unserved.
        models = self.node.models.values()
        if self.arrived < len(self.requests) or any(m.in_flight or m.pending for m in models):
            self.push(self.now + self.tick, _TICK, None)


def simulate(
    name: str,
    spec: NodeSpec,
    requests: Sequence[Request],
    settings: PolicySettings,
    *,
    decisions: Decisions,
    activity: Callable[[], ActivityLike],
    tick: float = 10.0,
    load_everything: bool = False,
) -> Outcome:
    """Replay `requests` on a node built from `spec` under `settings`.
    `load_everything` starts with every model on the device (the
    no-oversubscription reference; the device must hold them all)."""
    if not tick > 0:
        raise ValueError("tick must be > 0 seconds")
    run = _Run(name, spec, requests, settings, decisions, activity, tick, load_everything)
    return run.run()
