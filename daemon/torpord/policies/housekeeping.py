"""What the daemon does on its own: idle sleep, sleeper limits, time windows
and predicted preloading, in that order, as one plan.

No step touches a pinned model, one in use, or one in a transition, and a
model gets at most one action per call (the next call sees the result).

1. IDLE: an ACTIVE or OFFLOADED model with `idle_timeout > 0`, unused for
   at least that long (`now - max(last_use, since) >= idle_timeout`),
   sleeps at its `idle_level`. Level 2 keeps a disk copy when the model is
   an image (it has no source) or its evict_to is DISK; an image without
   disk room sleeps at level 1 instead. Level 1 needs host room: what is
   free, or made by pushing down level-1 sleepers less likely to be used;
   failing that it sleeps at level 2 (an image only with disk room), with
   a disk copy where room.disk_copy_wanted says so (as a pushed-down
   sleeper: evict_to HOST too, when the disk cache is faster than the
   source) and the disk cache has room. An idle_level of 2 is the owner's
   choice to let the model go cold when idle: evict_to HOST (the tier for
   evictions) keeps no disk copy there, only evict_to DISK does. A model
   in a warm DEVICE window does not go idle; in a HOST window, only to
   level 1. The likeliest idle models are handled first (they get the room).
2. PRESSURE: past `max_sleeping_models` level-1 sleepers or `host_limit`
   bytes held by them, the coldest (by the eviction order) are pushed down
   to level 2, until both hold; a model that just went idle is pushed by
   sleeping it at level 2 at once. Models in a warm window are not pushed.
   A pushed model keeps a disk copy where room.disk_copy_wanted says so (an
   image; evict_to DISK; evict_to HOST when the disk cache is faster than
   the source) and the disk cache has room; an image without it stays.
3. SCHEDULE: a model whose window is warm (schedule.py) is brought to the
   window's tier: HOST = a catalogue entry is loaded there, a level-2
   sleeper's weights are read back there (Sleep at level 1); a model with
   its weights in memory is warm enough; DEVICE = Wake, or Load to DEVICE
   of a catalogue entry.
   Into free memory, or by evicting models less likely to be used (never
   one in use).
4. PRELOAD (settings.preload): models predicted to be wanted (at least
   `settings.preload_min_uses` expected uses in the horizon, predict.py)
   are warmed to the host, likeliest first: a catalogue entry not loaded
   is loaded to HOST, a level-2 sleeper's weights are read back there
   (Sleep at level 1, as a HOST window does; it stays asleep) unless a
   caller put it there, freeing that host memory on purpose. Only within
   the sleeper limits (max_sleeping_models, host_limit, counting this
   round's sleeps and pushes), and only into host room left free beyond
   the devices' capacity: that much is where models evicted from the
   devices go, and preloads into it were pushed down again by the next
   evictions and read back again by the next preload (the simulator's
   default trace: mean time-to-ready 3.83 s before level-2 sleepers were
   preloaded, 77.6 s preloading them into any free host room, 3.82 s with
   the reserve; bursty 3.71 / 9.09 / 3.75 s, diurnal 2.77 / 8.74 /
   2.77 s). Never a catalogue entry whose size is unknown. It never
   evicts anything, and it never wakes a sleeper: a caller's Sleep must
   hold until the caller (or a request, through Acquire) wants the model
   back, and the simulator showed predicted wakes queueing on the
   host-to-device link ahead of real requests and filling the device room
   that misses then had to evict.

A catalogue entry whose size is unknown (`sized` False: its source can't
be read now) gets no action: no room can be planned for it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torpord.policies.actions import Action, Load, Sleep, Unload, Wake
from torpord.policies.order import eviction_key, likelihood
from torpord.policies.predict import HORIZON, expected_uses
from torpord.policies.room import HOST, Plan, blocker, disk_copy_wanted, host_routes, take
from torpord.policies.schedule import warm_window
from torpord.policies.stage import far_bytes
from torpord.policies.view import ModelView, NodeView
from torpord.types import Cause, ModelState, Tier

__all__ = ["housekeeping"]


def housekeeping(view: NodeView) -> Sequence[Action]:
    """What the daemon does on its own at this moment: idle models to sleep
    (IDLE), sleepers past `max_sleeping_models` or the host limit pushed down
    (PRESSURE), models whose window opens warmed (SCHEDULE), models predicted
    to be wanted warmed into free memory (PRELOAD). Never evicts a model in
    use or more likely to be used than the one it makes room for."""
    if not view.settings.enabled:
        return ()
    plan = Plan.start(view)
    _idle(plan)
    _limits(plan)
    _windows(plan)
    if view.settings.preload:
        _preload(plan)
    return tuple(plan.actions)


def _free_to_act(plan: Plan, model: ModelView) -> bool:
    return model.model_id not in plan.touched and blocker(model, ()) is None


def _disk_copy(plan: Plan, model: ModelView, nbytes: int, *, fell: bool) -> bool | None:
    """Whether a level-2 sleep of `model` keeps a disk copy (taking the disk
    room), or None when it can't sleep at level 2 (an image, no disk room).
    A model that `fell` to level 2 because level 1 can't be (a level-1
    sleeper pushed down, an idle model with no host room) keeps one where
    room.disk_copy_wanted says so; one asked for at level 2 only as an
    image or with evict_to DISK."""
    if fell:
        wanted = disk_copy_wanted(plan.view, model)
    else:
        wanted = model.image or model.policy.evict_to is Tier.DISK
    if wanted and plan.disk_free is not None and plan.disk_free >= nbytes:
        plan.disk_free -= nbytes
        return True
    return None if model.image else False


def _idle(plan: Plan) -> None:
    view = plan.view
    idle: list[tuple[float, str, ModelView, int]] = []
    for model in view.models:
        timeout = model.policy.idle_timeout
        if model.state not in (ModelState.ACTIVE, ModelState.OFFLOADED) or timeout <= 0:
            continue
        if not _free_to_act(plan, model):
            continue
        if view.now - max(model.activity.last_use, model.since) < timeout:
            continue
        window = warm_window(model.policy, view.now)
        if window is not None and window.tier is Tier.DEVICE:
            continue
        level = 1 if window is not None else model.policy.idle_level
        idle.append((-likelihood(view, model), model.model_id, model, level))
    for _, _, model, level in sorted(idle, key=lambda item: item[:2]):
        _sleep(plan, model, level, deeper=level == 2 or warm_window(model.policy, view.now) is None)


def _sleep(plan: Plan, model: ModelView, level: int, *, deeper: bool) -> None:
    """Sleep `model` (IDLE) at `level`, or the other level where that can't be."""
    view = plan.view
    on_device, in_host = model.bytes_in(Tier.DEVICE), model.bytes_in(Tier.HOST)
    if level == 1:
        likely = likelihood(view, model)
        trial = plan.copy()
        if take(trial, HOST, on_device, eligible=lambda other: likelihood(view, other) < likely):
            trial.release(model.device, on_device)
            trial.add(Sleep(model.model_id, 1, Cause.IDLE))
            plan.become(trial)
            return
        if not deeper:
            return
    trial = plan.copy()
    copy = _disk_copy(trial, model, on_device + in_host, fell=level == 1)
    if copy is not None:
        trial.release(model.device, on_device)
        trial.release(HOST, in_host)
        trial.add(Sleep(model.model_id, 2, Cause.IDLE, disk_copy=copy))
        plan.become(trial)
    elif level == 2:  # an image with no disk room: level 1 will do
        _sleep(plan, model, 1, deeper=False)


def _limits(plan: Plan) -> None:
    """Push the coldest level-1 sleepers down while there are too many."""
    view = plan.view
    most, limit = view.settings.max_sleeping_models, view.settings.host_limit
    if most <= 0 and limit <= 0:
        return
    went_idle = {
        action.model_id: index
        for index, action in enumerate(plan.actions)
        if isinstance(action, Sleep) and action.level == 1
    }
    count, held = 0, 0
    pushable: list[tuple[tuple[float, float, float, str], ModelView, int]] = []
    for model in view.models:
        asleep = model.state is ModelState.ASLEEP and model.sleep_level == 1
        new = model.model_id in went_idle
        if not (asleep and model.model_id not in plan.touched) and not new:
            continue
        nbytes = model.bytes_in(Tier.HOST) + (model.bytes_in(Tier.DEVICE) if new else 0)
        count, held = count + 1, held + nbytes
        if not new and not _free_to_act(plan, model):
            continue
        if warm_window(model.policy, view.now) is not None:
            continue
        routes = host_routes(view, model)
        to_tier = routes[0] if routes else Tier.SOURCE
        key = eviction_key(
            view, model, freed=nbytes, back=nbytes, now_tier=Tier.HOST, to_tier=to_tier
        )
        pushable.append((key, model, nbytes))
    for _, model, nbytes in sorted(pushable, key=lambda item: item[0]):
        if (most <= 0 or count <= most) and (limit <= 0 or held <= limit):
            return
        trial = plan.copy()
        copy = _disk_copy(trial, model, nbytes, fell=True)
        if copy is None:
            continue
        index = went_idle.get(model.model_id)
        if index is None:
            trial.add(Sleep(model.model_id, 2, Cause.PRESSURE, disk_copy=copy))
        else:
            trial.actions[index] = Sleep(model.model_id, 2, Cause.IDLE, disk_copy=copy)
        trial.release(HOST, nbytes)
        plan.become(trial)
        count, held = count - 1, held - nbytes


def _windows(plan: Plan) -> None:
    view = plan.view
    for model in sorted(view.models, key=lambda model: model.model_id):
        window = warm_window(model.policy, view.now)
        if window is None or not _free_to_act(plan, model):
            continue
        catalogued = model.state is ModelState.UNLOADED and bool(model.source)
        if catalogued and not model.sized:
            continue  # (no room can be planned for it: see the module's docstring)
        action: Action
        if window.tier is Tier.DEVICE and catalogued:
            pool, needed = model.device, model.total_bytes
            action = Load(model.model_id, model.source, Tier.DEVICE, Cause.SCHEDULE)
        elif window.tier is Tier.DEVICE and model.state in (
            ModelState.ASLEEP,
            ModelState.OFFLOADED,
        ):
            pool = model.device
            needed = model.total_bytes - model.bytes_in(Tier.DEVICE)
            action = Wake(model.model_id, Cause.SCHEDULE)
        elif window.tier is not Tier.DEVICE and catalogued:
            pool, needed = HOST, model.total_bytes
            action = Load(model.model_id, model.source, Tier.HOST, Cause.SCHEDULE)
        elif window.tier is not Tier.DEVICE and model.state is ModelState.ASLEEP:
            pool, needed = HOST, far_bytes(model)
            if model.sleep_level != 2 or needed <= 0:
                continue
            action = Sleep(model.model_id, 1, Cause.SCHEDULE)
        else:
            continue
        if pool != HOST and pool not in plan.device_free:
            continue
        likely = likelihood(view, model)
        trial = plan.copy()
        colder = lambda other, likely=likely: likelihood(view, other) < likely  # noqa: E731
        if take(trial, pool, needed, keep={model.model_id}, eligible=colder):
            if isinstance(action, Wake):
                trial.release(HOST, model.bytes_in(Tier.HOST))
            trial.add(action)
            plan.become(trial)


def _level_one(plan: Plan) -> tuple[int, int]:
    """The level-1 sleepers once the plan's actions have run: how many, and
    the host bytes they hold."""
    view = plan.view
    sleepers = {
        model.model_id: model.bytes_in(Tier.HOST)
        for model in view.models
        if model.state is ModelState.ASLEEP and model.sleep_level == 1
    }
    for action in plan.actions:
        model = view.model(action.model_id)
        if model is None:
            continue
        if isinstance(action, Sleep) and action.level == 1:  # (a sleeper's is read back)
            asleep = model.state is ModelState.ASLEEP
            sleepers[model.model_id] = model.total_bytes - (0 if asleep else far_bytes(model))
        elif isinstance(action, Load) and action.tier is Tier.HOST:
            sleepers[model.model_id] = model.total_bytes
        elif isinstance(action, Sleep | Wake | Unload):
            sleepers.pop(model.model_id, None)
    return len(sleepers), sum(sleepers.values())


def _preload(plan: Plan) -> None:
    view = plan.view
    wanted: list[tuple[float, str, ModelView, Action]] = []
    for model in view.models:
        if not _free_to_act(plan, model) or not model.sized:
            continue
        action: Action
        if model.state is ModelState.UNLOADED and model.source:
            action = Load(model.model_id, model.source, Tier.HOST, Cause.PRELOAD)
        elif (
            model.state is ModelState.ASLEEP
            and model.sleep_level == 2
            and far_bytes(model) > 0
            and not model.by_caller  # (a caller's level 2 freed host memory on purpose)
        ):
            action = Sleep(model.model_id, 1, Cause.PRELOAD)
        else:
            continue  # (loaded and warm already, or its weights are in memory)
        uses = expected_uses(model.activity, view.now, HORIZON)
        if uses >= view.settings.preload_min_uses:
            wanted.append((-uses, model.model_id, model, action))
    # Host room the devices' evictions would take stays free (see the docstring).
    reserve = sum(pool.capacity for pool in view.devices.values())
    most, limit = view.settings.max_sleeping_models, view.settings.host_limit
    count, held = _level_one(plan)
    for _, _, model, action in sorted(wanted, key=lambda item: item[:2]):
        nbytes = far_bytes(model)  # (read into the host)
        after = held + nbytes + model.bytes_in(Tier.HOST)
        if nbytes + reserve > plan.host_free:
            continue
        if (most > 0 and count + 1 > most) or (limit > 0 and after > limit):
            continue
        plan.host_free -= nbytes
        count, held = count + 1, after
        plan.add(action)
