"""The daemon runs the policies' decisions.

The pilot builds the node's view for the pure decisions of
`torpord.policies` (core/nodeview.py) and runs the actions they return
through the manager's verbs, each an ordinary transition with its cause:

- memory pressure: a caller's Load, Wake, Offload or level-1 Sleep (or an
  Acquire) that finds its pool full evicts instead of refusing (`with_room`): the
  evictions `make_room` chooses run (cause PRESSURE), each victim looked at
  again just before (one in use or busy by then is spared, the rest planned
  again), and the call is tried again, a bounded number of times (memory
  freed can be taken meanwhile).
  RESOURCE_EXHAUSTED remains when nothing evictable makes room, its metadata
  naming the models that block (pinned, in use, in transition);
- housekeeping: every `interval` seconds, what `housekeeping` decides (idle
  models to sleep, sleepers pushed down, preloads) runs, one action per
  model at a time, each failure logged and the model held back from the
  next rounds for a while (core/backoff.py). Catalogue entries not loaded
  are in the view with the size their source's headers say (core/sizes.py,
  refreshed from this loop); one whose source can't be read has none.

With the policy layer off (`[policy] enabled = false`) none of this runs:
the daemon does what callers ask and nothing else.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import structlog

from torpord.core.backoff import Backoff
from torpord.core.model import Model, ModelSnapshot
from torpord.core.nodeview import Bandwidths, build_view, entry_views, model_view, pool_of
from torpord.core.preempt import CALLERS
from torpord.core.refusals import refused
from torpord.core.steering import Steered
from torpord.errors import ResourceExhausted, TorporError
from torpord.policies.actions import Action, Load, Offload, Refusal, Sleep, Unload, Wake
from torpord.policies.decide import acquire, housekeeping, make_room
from torpord.policies.room import blocker
from torpord.policies.settings import ModelPolicy, PolicySettings
from torpord.policies.view import ActivitySummary, ModelView, NodeView
from torpord.types import Cause, ModelState

__all__ = ["ROOM_ROUNDS", "Pilot"]

log = structlog.get_logger("torpord.pilot")

T = TypeVar("T")

# How often a call that found its pool full makes room and tries again.
ROOM_ROUNDS = 4
# How often an Acquire looks again while it waits for models in use or in
# a transition to be let go of (for up to ManagerSettings.acquire_patience:
# engines report the end of their use at most once a second).
PATIENCE_STEP = 0.05


class Pilot:
    def __init__(self, manager: Steered) -> None:
        self._m = manager
        self.bandwidths = Bandwidths()
        # Making room in a pool is one at a time: two callers must not pick
        # the same models to evict, nor count the same free bytes. One lock
        # per pool ("host", or a device's uuid), so that an eviction waiting
        # for an engine on one GPU holds up no other GPU.
        self._rooms: dict[str, asyncio.Lock] = {}
        self._loop: asyncio.Task[None] | None = None
        self._acting: dict[str, asyncio.Task[None]] = {}  # model id -> the policy's action
        self.rounds = 0  # housekeeping rounds done
        self.backoff = Backoff(manager.settings.policy_interval)  # models whose action failed

    @property
    def settings(self) -> PolicySettings:
        return self._m.settings.policy

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    # -- the view --------------------------------------------------------------

    def policy(self, model: Model) -> ModelPolicy:
        return model.policy

    def activity(self, model_id: str) -> ActivitySummary:
        return self._m.activity.summary(model_id)

    def entries(self) -> Sequence[ModelView]:
        loaded, validating = self._m.registry.models, self._m.registry.validating
        return entry_views(
            (e for e in self._m.catalogue.entries() if e.model_id not in loaded),
            device=self._m.backend.pick_device,
            activity=self.activity,
            busy=lambda model_id: model_id in self._acting or model_id in validating,
        )

    def entry(self, model_id: str) -> tuple[str, str] | None:
        """The catalogue's source and device for `model_id`, if it has it."""
        entry = self._m.catalogue.get(model_id)
        return (entry.source, entry.device) if entry is not None else None

    def view(self) -> NodeView:
        models = list(self._m.registry.models.values())
        self.bandwidths.observe(models)
        return build_view(
            models,
            self._m.backend,
            self._m.disk,
            self.settings,
            self.bandwidths.current(),
            policy=self.policy,
            activity=self.activity,
            extra=self.entries(),
            acting=self._acting,
        )

    # -- actions ---------------------------------------------------------------

    async def run(self, action: Action) -> ModelSnapshot:
        """Run one action through the manager's verbs, with its cause."""
        m, cause = self._m, action.cause
        match action:
            case Sleep(model_id, level, _, disk_copy):
                return await m.sleep(model_id, level, disk_copy=disk_copy, cause=cause)
            case Offload(model_id, layers, tier, _):
                return await m.offload(model_id, layers, tier, cause=cause)
            case Wake(model_id, _):
                return await m.wake(model_id, cause=cause)
            case Load(model_id, source, tier, _):
                return await m.load(model_id, source, target=tier, cause=cause)
            case Unload(model_id, _):
                return await m.unload(model_id, cause=cause)

    async def with_room(
        self, model_id: str, cause: Cause, attempt: Callable[[], Awaitable[T]]
    ) -> T:
        """`attempt()`; when it finds its pool full (OUT_OF_MEMORY) and the
        caller is a caller (not a policy: evictions don't evict), make room
        and try again. `attempt` must change nothing when it fails so.

        An Acquire is patient: when only models in use or in a transition
        block, it waits (up to `acquire_patience` seconds) for them to be let
        go of, as a router would rather wait than fail; a caller's Load or
        Wake is refused at once."""
        if not self.enabled or cause not in CALLERS:
            return await attempt()
        clock = asyncio.get_running_loop().time
        patience = self._m.settings.acquire_patience if cause is Cause.ACQUIRE else 0.0
        deadline = clock() + patience
        rounds = 0
        while True:
            try:
                return await attempt()
            except ResourceExhausted as err:
                if err.reason != "OUT_OF_MEMORY" or rounds == ROOM_ROUNDS - 1:
                    raise
                pool = pool_of(err.metadata, (d.uuid for d in self._m.backend.devices()))
                if pool is None:
                    raise
                try:
                    await self._make_room(model_id, pool, err)
                except ResourceExhausted as refusal:
                    waiting = {"in_use", "in_transition"} & refusal.metadata.keys()
                    if not waiting or clock() >= deadline:
                        raise
                    await asyncio.sleep(PATIENCE_STEP)  # (then look again)
                    continue
                rounds += 1

    async def _make_room(self, model_id: str, pool: str, err: ResourceExhausted) -> None:
        """Run the evictions `make_room` chooses. Each victim is looked at
        again just before its eviction runs (the ones before it took time):
        one that has become in use (an Acquire's hold, say), pinned, busy or
        different from what was planned is left alone, and the room still
        missing is planned again from a new view."""
        async with self._room(pool):
            for _ in range(ROOM_ROUNDS):
                if await self._evict(model_id, pool, err):
                    return

    def _room(self, pool: str) -> asyncio.Lock:
        lock = self._rooms.get(pool)
        if lock is None:  # (one per pool: the host and each device, so bounded)
            lock = self._rooms[pool] = asyncio.Lock()
        return lock

    async def _evict(self, model_id: str, pool: str, err: ResourceExhausted) -> bool:
        """One plan's evictions; False when a victim changed (plan again)."""
        view = self.view()
        room = view.host if pool == "host" else view.devices[pool]
        needed = int(err.metadata.get("asked", "0")) - room.free
        if needed <= 0:
            return True  # freed meanwhile: try again
        try:
            decision = make_room(view, pool, needed, keep={model_id})
        except Exception:  # (a bug in a decision: the caller gets the plain refusal)
            log.exception("making room failed", model_id=model_id, pool=pool)
            raise err from None
        if isinstance(decision, Refusal):
            raise refused(err, decision) from None
        log.info(
            "making room",
            model_id=model_id,
            pool=pool,
            needed=needed,
            actions=[f"{type(a).__name__} {a.model_id}" for a in decision],
        )
        for action in decision:
            planned = view.model(action.model_id)
            if planned is None or self._changed(planned, keep=model_id):
                log.info("a victim changed; planning again", victim=action.model_id)
                return False
            await self._try(action, "an eviction failed")  # (the next round sees what is left)
        return True

    def _changed(self, planned: ModelView, *, keep: str, acting: bool = True) -> bool:
        """Whether a model may no longer be acted on as planned: gone, in
        use, pinned, busy, put where it is by a caller, or moved since the
        plan's view (a catalogue entry planned for: loaded meanwhile).
        `acting`: a policy's action on it counts as busy (False: for that
        very action)."""
        model = self._m.registry.find(planned.model_id)
        if model is None or planned.state is ModelState.UNLOADED:
            return (model is None) != (planned.state is ModelState.UNLOADED)
        now = model_view(
            model,
            self.policy(model),
            self.activity(model.model_id),
            acting=acting and model.model_id in self._acting,
        )
        moved = (now.state, now.sleep_level, now.layers, now.by_caller) != (
            planned.state,
            planned.sleep_level,
            planned.layers,
            planned.by_caller,
        )
        return moved or blocker(now, {keep}) is not None

    async def stage(self, model_id: str) -> bool:
        """Acquire's staging (policies/stage.py): when room must be made on
        the device for a model read from its source or a disk copy, read it
        into host memory first (pushing colder sleepers down for the room),
        so the device is held only for the copy from there. Whether it did;
        False changes nothing the caller relies on: it wakes the model as
        it would have (a failed staging step is logged, not raised)."""
        if not self.enabled:
            return False
        async with self._room("host"):
            try:
                decision = acquire(self.view(), model_id)
            except TorporError:
                return False
            staged = (
                not isinstance(decision, Refusal)
                and bool(decision)
                and isinstance(decision[-1], Sleep | Load)
                and decision[-1].model_id == model_id
            )
            if not staged:
                return False
            assert not isinstance(decision, Refusal)
            *room, step = decision
            for action in room:
                if not await self._try(action):
                    return False
        return await self._try(step)

    async def _try(self, action: Action, event: str = "a staging step did not run") -> bool:
        """Run `action`; False (logged as `event`) when it failed."""
        try:
            await self.run(action)
        except TorporError as failed:
            log.warning(
                event,
                model_id=action.model_id,
                action=type(action).__name__,
                reason=failed.reason,
                error=failed.message,
            )
            return False
        return True

    # -- housekeeping ------------------------------------------------------------

    def start(self) -> None:
        """Start the housekeeping loop (the daemon does; the core's tests may)."""
        if self._loop is None:
            self._loop = asyncio.create_task(self._housekeep(), name="housekeeping")
            self._m.sizes.tick()  # (the config's entries: read at once)

    async def stop(self) -> None:
        """Stop the loop and the actions' callers (the transitions they
        started go on: the manager's close lets them finish or rolls them back)."""
        tasks = [t for t in (self._loop, *self._acting.values()) if t is not None]
        self._loop = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self._m.sizes.stop()

    @property
    def running(self) -> bool:
        """Whether the housekeeping loop runs."""
        return self._loop is not None and not self._loop.done()

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(self._m.settings.policy_interval)
            self._m.sizes.tick()
            if self.enabled:
                self.housekeep_once()
            self.rounds += 1

    def housekeep_once(self) -> list[asyncio.Task[None]]:
        """One round: start what `housekeeping` decides now; the tasks started.
        A window's or a preload's action waits for the round's actions before
        it (the evictions that make its room: they come first)."""
        now = asyncio.get_running_loop().time()
        try:
            view = self.backoff.hold_back(self.view(), now)
            actions = housekeeping(view)
        except Exception:  # (a bug in a decision must not stop the daemon)
            log.exception("housekeeping failed")
            return []
        started: list[asyncio.Task[None]] = []
        for action in actions:
            if action.model_id in self._acting:
                continue  # one action per model at a time
            after = tuple(started) if action.cause in (Cause.SCHEDULE, Cause.PRELOAD) else ()
            task = asyncio.create_task(
                self._act(action, after, view.model(action.model_id)),
                name=f"{type(action).__name__} {action.model_id}",
            )
            self._acting[action.model_id] = task
            task.add_done_callback(functools.partial(self._acted, action.model_id))
            started.append(task)
        return started

    def _acted(self, model_id: str, task: asyncio.Task[None]) -> None:
        if self._acting.get(model_id) is task:
            del self._acting[model_id]

    async def _act(
        self,
        action: Action,
        after: Sequence[asyncio.Task[None]] = (),
        planned: ModelView | None = None,
    ) -> None:
        """Run `action`, decided on `planned` (the model as the round saw it),
        once the tasks `after` are done. A model that changed while it waited
        (an Acquire woke it and holds it, a caller slept it, it became busy
        or pinned) is left alone: the next round decides on it afresh."""
        bound = log.bind(
            model_id=action.model_id, action=type(action).__name__, cause=action.cause.value
        )
        if after:
            await asyncio.wait(after)
            if planned is not None and self._changed(planned, keep="", acting=False):
                bound.info("a policy's action is moot: the model changed while it waited")
                return
        clock = asyncio.get_running_loop().time
        try:
            await self.run(action)
        except TorporError as err:
            wait = self.backoff.failed(action.model_id, clock())
            bound.info(
                "a policy's action did not run",
                reason=err.reason,
                error=err.message,
                retry_in=wait,
            )
        except Exception:
            self.backoff.failed(action.model_id, clock())
            bound.exception("a policy's action failed unexpectedly")
        else:
            self.backoff.succeeded(action.model_id)
