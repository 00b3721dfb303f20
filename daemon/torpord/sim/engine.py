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
Every `tick` simulated seconds the engine runs
`decisions.housekeeping(view)` and commits what it returns.

A Refusal is answered as the daemon answers it (core/pilot.py, with_room):
when models in use or in a transition block (the Refusal's `blocked`), the
Acquire waits for them, asking again whenever memory frees (a transition
ends, or a model's last request does), for up to `Router.patience` seconds
from its first refusal (the daemon's [policy] acquire_patience, 5 s);
otherwise, or when its patience runs out, it is refused (RESOURCE_EXHAUSTED,
counted in `refusals`; the request in `refused`). The router in front of the
daemon then retries: `Router.retry_after` seconds (1 s) later the request
calls Acquire again (one more use in the activity, a fresh patience), until
it is served; finding the model ready then is not a hit. Its time-to-ready
runs from its arrival to ready, retries included: what the user waits. A
request refused when nothing is in use or in a transition and no request is
still to come would be refused for ever: it is counted unserved, dropped.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torpord.config.model import PolicyConfig
from torpord.policies.actions import Action, Load, Offload, Refusal, Sleep, Unload, Wake
from torpord.policies.room import IN_TRANSITION, IN_USE
from torpord.policies.settings import PolicySettings
from torpord.policies.view import NodeView
from torpord.sim.node import ActivityLike, PolicyViolation, SimModel, SimNode, Transfer
from torpord.sim.spec import NodeSpec
from torpord.sim.trace import Request
from torpord.types import Cause, Tier

__all__ = ["DEFAULT_ROUTER", "Decisions", "Outcome", "Router", "simulate"]
# What a Refusal's `blocked` says of models an Acquire waits for.
_WAITED_FOR = frozenset({IN_USE, IN_TRANSITION})

# Event kinds, in the order they run at one instant: what frees memory
# first, then what asks for it, then patience running out.
_DONE, _END, _ARRIVAL, _RETRY, _GIVE_UP, _TICK = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Router:
    """How the daemon and the router in front of it answer a request that
    finds no room: the Acquire waits up to `patience` seconds (the daemon's
    [policy] acquire_patience) for models in use or in a transition, and
    after a refusal the router asks again `retry_after` seconds later."""

    patience: float = PolicyConfig.acquire_patience
    retry_after: float = 1.0

    def __post_init__(self) -> None:
        if not self.patience >= 0:
            raise ValueError(f"acquire patience: expected >= 0 seconds, got {self.patience}")
        if not self.retry_after > 0:
            raise ValueError(f"router retry delay: expected > 0 seconds, got {self.retry_after}")


DEFAULT_ROUTER = Router()


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
    refusals: int = 0  # Acquires answered RESOURCE_EXHAUSTED (each retry counts)
    refused: int = 0  # requests refused at least once (served after a retry, or not)
    unserved: int = 0  # requests that would be refused for ever
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
        router: Router,
    ) -> None:
        self.node = SimNode(spec, settings, activity)
        if load_everything:
            self.node.load_everything()
        self.start = spec.start
        self.requests = requests
        self.decisions = decisions
        self.tick = tick
        self.router = router
        self.out = Outcome(name, requests=len(requests), device_capacity=spec.device)
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.links: dict[str, float] = {}
        self.refused: dict[str, list[int]] = {}  # model id -> the requests waiting for room
        self.deadline: dict[int, float] = {}  # request -> when its Acquire's patience ends
        self.turned_away: set[int] = set()  # requests refused at least once
        self.retrying = 0  # requests whose router is to ask again
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
                self.arrived += 1
                self.on_arrival(payload)  # type: ignore[arg-type]
            elif kind == _RETRY:
                self.retrying -= 1
                self.on_arrival(payload)  # type: ignore[arg-type]
            elif kind == _GIVE_UP:
                self.on_give_up(*payload)  # type: ignore[misc]
            else:
                self.on_tick()
            device = self.node.used[Tier.DEVICE]
        self.out.seconds = last - first
        self.out.refused = len(self.turned_away)
        return self.out

    # -- requests --------------------------------------------------------

    def on_arrival(self, i: int) -> None:
        """Request `i` calls Acquire: on its arrival, or its router's retry."""
        r = self.requests[i]
        m = self.node.models[r.model_id]
        m.activity.record(self.now, "acquire", 1, 0.0, 0)
        if m.ready:
            if i not in self.turned_away:
                self.out.hits += 1
            self.begin(m, i)
        elif m.pending:
            m.waiters.append(i)
        elif r.model_id in self.refused:  # asking now would be refused as they were
            self.park(r.model_id, [i])
        else:
            self.ask(m, [i])

    def ask(self, m: SimModel, waiting: list[int]) -> None:
        """Acquire `m` for the requests `waiting` (none of them started)."""
        answer = self.decisions.acquire(self.node.view(self.now), m.model_id)
        if isinstance(answer, Refusal):
            if _WAITED_FOR.intersection(answer.blocked.values()):
                self.park(m.model_id, waiting)
            else:  # nothing to wait for: refused at once
                for i in waiting:
                    self.refuse(i)
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

    def park(self, model_id: str, waiting: list[int]) -> None:
        """Let `waiting` wait for room, each until its patience runs out."""
        parked = self.refused.setdefault(model_id, [])
        for i in waiting:
            deadline = self.deadline.get(i)
            if deadline is None:  # its Acquire's first refusal
                deadline = self.deadline[i] = self.now + self.router.patience
                self.push(deadline, _GIVE_UP, (i, deadline))
            if self.now >= deadline:
                self.refuse(i)
            else:
                parked.append(i)
        if not parked:
            del self.refused[model_id]

    def on_give_up(self, i: int, deadline: float) -> None:
        parked = self.refused.get(self.requests[i].model_id)
        if self.deadline.get(i) != deadline or parked is None or i not in parked:
            return  # served, refused already, or waiting for a transition
        parked.remove(i)
        if not parked:
            del self.refused[self.requests[i].model_id]
        self.refuse(i)

    def refuse(self, i: int) -> None:
        """The daemon answers RESOURCE_EXHAUSTED; the router tries again
        later, unless nothing could ever change the answer."""
        self.out.refusals += 1
        self.turned_away.add(i)
        self.deadline.pop(i, None)
        models = self.node.models.values()
        if self.arrived == len(self.requests) and not any(m.in_flight or m.pending for m in models):
            self.out.unserved += 1
            return
        self.retrying += 1
        self.push(self.now + self.router.retry_after, _RETRY, i)

    def begin(self, m: SimModel, i: int) -> None:
        r = self.requests[i]
        self.deadline.pop(i, None)
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
        """Ask again for the models whose Acquires wait for room."""
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
        # Tick on while requests are still to come (or come again), run, or
        # wait for a transition or for room (which only those free).
        models = self.node.models.values()
        if (
            self.arrived < len(self.requests)
            or self.retrying
            or any(m.in_flight or m.pending for m in models)
        ):
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
    router: Router = DEFAULT_ROUTER,
) -> Outcome:
    """Replay `requests` on a node built from `spec` under `settings`.
    `load_everything` starts with every model on the device (the
    no-oversubscription reference; the device must hold them all).
    `router`: how a request that finds no room is refused and retried."""
    if not tick > 0:
        raise ValueError("tick must be > 0 seconds")
    run = _Run(name, spec, requests, settings, decisions, activity, tick, load_everything, router)
    return run.run()
