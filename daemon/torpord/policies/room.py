"""Making room in a pool: the working state of a decision, and evictions.

A `Plan` is what a decision has chosen so far: its actions in execution
order and the free bytes of each pool once they have run. `free_up` adds
to it the evictions that free a number of bytes of one pool, or answers a
Refusal and leaves it unchanged (all or nothing, like a transition).

Where an evicted model goes (`routes`), by its policy's `evict_to`:

- from a device: HOST = level-1 sleep (host room is made first by pushing
  level-1 sleepers down, see below; when none can be, level 2 instead,
  with a disk copy where `disk_copy_wanted` says so and the disk cache has
  room); DISK = level-2 sleep with a disk copy (needs disk room; without
  it, level 2 from the source); SOURCE = level-2 sleep. An image has no
  source: it goes to DISK where there is a disk cache, else HOST, and
  never to level 2 without a disk copy.
- from the host (a level-1 sleeper pushed down): level 2, with a disk copy
  where `disk_copy_wanted` says so: it is an image, its evict_to is DISK,
  or its evict_to is HOST and the disk cache brings it back to the device
  faster than its source (its owner wanted it kept warm: the disk copy is
  the warmest place left). Only with disk room, and never by evicting
  other disk entries; without room it goes to its source (an image can't
  be pushed down). SOURCE never keeps a disk copy: the operator asked for
  none.

With Granularity.LAYERS a device's last victim offloads just enough of its
layers (last first) to HOST instead of going whole.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

from torpord.errors import InvalidArgument
from torpord.policies.actions import Action, Offload, Refusal, Sleep
from torpord.policies.order import Key, eviction_key
from torpord.policies.settings import EvictionOrder, Granularity
from torpord.policies.view import ModelView, NodeView
from torpord.types import Cause, ModelState, Tier

__all__ = [
    "ASKED_FOR",
    "HOST",
    "IN_TRANSITION",
    "IN_USE",
    "NOWHERE",
    "PINNED",
    "Eligible",
    "Plan",
    "blocker",
    "disk_copy_wanted",
    "free_up",
    "host_routes",
    "take",
]

HOST = "host"  # the host pool's name
# Why a model can't be evicted (a Refusal's `blocked` values).
ASKED_FOR = "asked for"  # in `keep`: the model the room is for
PINNED = "pinned"
IN_USE = "in use"
IN_TRANSITION = "in transition"
NOWHERE = "nowhere to go"  # an image with no host and no disk room to go to

Eligible = Callable[[ModelView], bool]


@dataclass
class Plan:
    """The actions chosen so far, and each pool's free bytes after them."""

    view: NodeView
    host_free: int
    disk_free: int | None
    device_free: dict[str, int]
    actions: list[Action] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)  # models with an action
    keep: frozenset[str] = frozenset()  # models no eviction of this plan may touch

    @classmethod
    def start(cls, view: NodeView) -> Plan:
        return cls(
            view,
            view.host.free,
            view.disk.free if view.disk is not None else None,
            {uuid: pool.free for uuid, pool in view.devices.items()},
        )

    def copy(self) -> Plan:
        return replace(
            self,
            device_free=dict(self.device_free),
            actions=list(self.actions),
            touched=set(self.touched),
        )

    def become(self, other: Plan) -> None:
        self.host_free, self.disk_free = other.host_free, other.disk_free
        self.device_free, self.actions, self.touched = (
            other.device_free,
            other.actions,
            other.touched,
        )

    def release(self, pool: str, nbytes: int) -> None:
        """Count `nbytes` of `pool` free (an action of the plan frees them)."""
        if pool == HOST:
            self.host_free += nbytes
        else:
            self.device_free[pool] = self.device_free.get(pool, 0) + nbytes

    def add(self, action: Action) -> None:
        self.actions.append(action)
        self.touched.add(action.model_id)


def blocker(model: ModelView, keep: Collection[str]) -> str | None:
    """Why a policy may not evict `model`, or None."""
    if model.model_id in keep:
        return ASKED_FOR
    if model.policy.pinned:
        return PINNED
    if model.activity.in_use > 0:
        return IN_USE
    if model.busy or model.state.transitional:
        return IN_TRANSITION
    return None


@dataclass(frozen=True)
class _Candidate:
    model: ModelView
    freed: int  # bytes of the pool it frees when it goes whole
    key: Key
    routes: tuple[Tier, ...]  # where it may go, preferred first; () = nowhere


def _device_routes(view: NodeView, model: ModelView) -> tuple[Tier, ...]:
    to = model.policy.evict_to
    if to not in (Tier.HOST, Tier.DISK, Tier.SOURCE):
        to = Tier.HOST
    if to is Tier.SOURCE and model.image:
        to = Tier.DISK if view.disk is not None else Tier.HOST
    if to is Tier.DISK and view.disk is None:
        to = Tier.HOST if model.image else Tier.SOURCE
    if to is Tier.HOST:
        if not model.image:  # (no host room: level 2, with a disk copy if wanted)
            if disk_copy_wanted(view, model):
                return (Tier.HOST, Tier.DISK, Tier.SOURCE)
            return (Tier.HOST, Tier.SOURCE)
        return (Tier.HOST, Tier.DISK) if view.disk is not None else (Tier.HOST,)
    if to is Tier.DISK:
        return (Tier.DISK, Tier.HOST) if model.image else (Tier.DISK, Tier.SOURCE)
    return (Tier.SOURCE,)


def host_routes(view: NodeView, model: ModelView) -> tuple[Tier, ...]:
    """Where a level-1 sleeper pushed down to level 2 may go, preferred
    first (DISK: with a disk copy, where the disk cache has room; SOURCE:
    without); () = nowhere."""
    if model.image:
        return (Tier.DISK,) if view.disk is not None else ()
    if disk_copy_wanted(view, model):
        return (Tier.DISK, Tier.SOURCE)
    return (Tier.SOURCE,)


def disk_copy_wanted(view: NodeView, model: ModelView) -> bool:
    """Whether `model`, going to level 2 where level 1 was wanted but can't
    be (a level-1 sleeper pushed down; a device victim, or an idle model,
    with no host room for level 1), should keep a disk copy: an image (it
    has no source), evict_to DISK, or evict_to HOST when the disk cache
    brings it back to the device faster than its source. Never evict_to
    SOURCE, nor without a disk cache. The caller checks the disk room."""
    if view.disk is None:
        return False
    if model.image:
        return True
    to = model.policy.evict_to
    if to is Tier.DISK:
        return True
    if to is Tier.SOURCE:
        return False
    nbytes = model.total_bytes  # (HOST, or what _device_routes reads as HOST)
    bandwidth = view.bandwidth
    return bandwidth.seconds_to_device(Tier.DISK, nbytes) < bandwidth.seconds_to_device(
        Tier.SOURCE, nbytes
    )


def _candidates(
    plan: Plan, pool: str, keep: Collection[str], eligible: Eligible | None
) -> tuple[list[_Candidate], dict[str, str]]:
    """The models that could free bytes of `pool`, and the ones that hold
    some but may not go (model id → why)."""
    view = plan.view
    found: list[_Candidate] = []
    blocked: dict[str, str] = {}
    for model in view.models:
        if not model.loaded or model.model_id in plan.touched:
            continue
        if pool == HOST:
            held = model.bytes_in(Tier.HOST)
            if held <= 0:
                continue
            evictable = model.state is ModelState.ASLEEP and model.sleep_level == 1
        else:
            held = model.bytes_in(Tier.DEVICE)
            moving = model.busy or model.state.transitional
            if model.device != pool or (held <= 0 and not moving):
                continue
            evictable = model.state in (ModelState.ACTIVE, ModelState.OFFLOADED)
        why = blocker(model, keep)
        if why is None and not evictable:
            if not model.state.transitional and model.state is not ModelState.FAILED:
                continue  # (awake with offloaded layers: its host bytes are not a sleeper's)
            why = IN_TRANSITION if model.state.transitional else model.state.value.lower()
        if why is not None:
            blocked[model.model_id] = why
            continue
        if held <= 0 or (eligible is not None and not eligible(model)):
            continue
        if pool == HOST:
            routes = host_routes(view, model)
            now_tier, back = Tier.HOST, held
        else:
            routes = _device_routes(view, model)
            now_tier = Tier.DEVICE
            back = held if routes[0] is Tier.HOST else held + model.bytes_in(Tier.HOST)
        to_tier = routes[0] if routes else Tier.SOURCE
        key = eviction_key(view, model, freed=held, back=back, now_tier=now_tier, to_tier=to_tier)
        found.append(_Candidate(model, held, key, routes))
    found.sort(key=lambda candidate: candidate.key)
    return found, blocked


def _last_layers(model: ModelView, needed: int) -> tuple[tuple[str, ...], int]:
    """The fewest device layers, last first, holding at least `needed` bytes."""
    names: list[str] = []
    total = 0
    for layer in reversed(model.layers):
        if total >= needed:
            break
        if layer.tier is Tier.DEVICE:
            names.append(layer.name)
            total += layer.size
    return tuple(reversed(names)), total


def take(
    plan: Plan,
    pool: str,
    needed: int,
    *,
    keep: Collection[str] = (),
    eligible: Eligible | None = None,
) -> bool:
    """Take `needed` bytes of `pool` in `plan`, first making them free by
    evictions (PRESSURE) among the models `eligible` allows; False, plan
    unchanged, when they can't be."""
    free = plan.host_free if pool == HOST else plan.device_free.get(pool, 0)
    if free < needed and free_up(plan, pool, needed - free, keep=keep, eligible=eligible):
        return False
    if pool == HOST:
        plan.host_free -= needed
    else:
        plan.device_free[pool] -= needed
    return True


def _evict(
    plan: Plan, pool: str, candidate: _Candidate, remaining: int, cause: Cause, layers: bool
) -> int | None:
    """Add `candidate`'s eviction to `plan`; the bytes freed, or None (plan
    unchanged) when it has nowhere to go."""
    model, model_id = candidate.model, candidate.model.model_id
    host_bytes = model.bytes_in(Tier.HOST)
    if pool != HOST and layers and remaining < candidate.freed:
        names, nbytes = _last_layers(model, remaining)
        trial = plan.copy()
        if take(trial, HOST, nbytes):
            trial.add(Offload(model_id, names, Tier.HOST, cause))
            trial.device_free[pool] += nbytes
            plan.become(trial)
            return nbytes
    for route in candidate.routes:
        trial = plan.copy()
        if pool == HOST:  # a level-1 sleeper: its host bytes go
            if route is Tier.DISK:
                if trial.disk_free is None or trial.disk_free < host_bytes:
                    continue
                trial.disk_free -= host_bytes
            trial.host_free += host_bytes
            trial.add(Sleep(model_id, 2, cause, disk_copy=route is Tier.DISK))
        elif route is Tier.HOST:
            if not take(trial, HOST, candidate.freed):
                continue
            trial.add(Sleep(model_id, 1, cause))
        else:
            in_memory = candidate.freed + host_bytes
            if route is Tier.DISK:
                if trial.disk_free is None or trial.disk_free < in_memory:
                    continue
                trial.disk_free -= in_memory
            trial.host_free += host_bytes
            trial.add(Sleep(model_id, 2, cause, disk_copy=route is Tier.DISK))
        if pool != HOST:
            trial.device_free[pool] += candidate.freed
        plan.become(trial)
        return candidate.freed
    return None


def _prune(chosen: list[_Candidate], needed: int) -> list[_Candidate]:
    """Drop, dearest first, the victims the others make unnecessary."""
    total = sum(candidate.freed for candidate in chosen)
    kept = list(chosen)
    for candidate in reversed(chosen):
        if total - candidate.freed >= needed:
            kept.remove(candidate)
            total -= candidate.freed
    return kept


def free_up(
    plan: Plan,
    pool: str,
    needed: int,
    *,
    keep: Collection[str] = (),
    eligible: Eligible | None = None,
    cause: Cause = Cause.PRESSURE,
) -> Refusal | None:
    """Add to `plan` the evictions that free `needed` more bytes of `pool`
    (beyond what the plan has freed), by the eviction order, among the
    models `eligible` allows (all by default); or a Refusal, plan unchanged."""
    view = plan.view
    if pool != HOST and pool not in view.devices:
        raise InvalidArgument(f"unknown device {pool!r}", reason="UNKNOWN_DEVICE")
    if needed <= 0:
        return None
    candidates, blocked = _candidates(plan, pool, plan.keep | frozenset(keep), eligible)
    layers = pool != HOST and view.settings.granularity is Granularity.LAYERS
    prune = view.settings.eviction is EvictionOrder.COST and not layers
    nowhere: set[str] = {c.model.model_id for c in candidates if not c.routes}
    while True:
        chosen: list[_Candidate] = []
        total = 0
        for candidate in candidates:
            if candidate.model.model_id in nowhere:
                continue
            if total >= needed:
                break
            chosen.append(candidate)
            total += candidate.freed
        if total < needed:
            blocked.update(dict.fromkeys(sorted(nowhere), NOWHERE))
            return Refusal(pool, needed, needed - total, dict(sorted(blocked.items())))
        if prune:
            chosen = _prune(chosen, needed)
        trial = plan.copy()
        remaining = needed
        for candidate in chosen:
            freed = _evict(trial, pool, candidate, remaining, cause, layers)
            if freed is None:
                nowhere.add(candidate.model.model_id)
                break
            remaining -= freed
        else:
            plan.become(trial)
            return None
