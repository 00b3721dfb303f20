"""Hand-built node views for the policy tests: a few bytes per model, one
device ("gpu0") unless told, pools sized to what the models hold."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torpord.policies.actions import Action, Refusal
from torpord.policies.settings import ModelPolicy, PolicySettings
from torpord.policies.view import (
    ActivitySummary,
    Bandwidth,
    LayerView,
    ModelView,
    NodeView,
    PoolView,
)
from torpord.types import ModelState, Tier

GB = 1 << 30
GPU = "gpu0"
NOW = 1_000_000.0  # the clock of every view unless told


def activity(
    *,
    last_use: float = 0.0,
    in_use: int = 0,
    uses: int = 0,
    recent: Mapping[float, int] | None = None,
    weekly: Sequence[float] = (),
) -> ActivitySummary:
    return ActivitySummary(
        last_use=last_use,
        in_use=in_use,
        uses=uses,
        recent=dict(recent or {}),
        weekly=tuple(weekly),
    )


def used(per_hour: float) -> ActivitySummary:
    """A model used steadily `per_hour` times an hour, last a second ago."""
    rate = per_hour / 3600.0
    return activity(
        last_use=NOW - 1,
        uses=int(per_hour * 24),
        recent={60.0: round(rate * 60), 3600.0: round(per_hour), 86400.0: round(rate * 86400)},
    )


def model(
    model_id: str,
    size: int = GB,
    *,
    state: ModelState = ModelState.ACTIVE,
    level: int = 0,
    layers: int = 4,
    tiers: Sequence[Tier] | None = None,
    device: str = GPU,
    policy: ModelPolicy | None = None,
    act: ActivitySummary | None = None,
    busy: bool = False,
    since: float = 0.0,
    image: bool = False,
    source: str = "",
    by_caller: bool = False,
) -> ModelView:
    """A model of `size` bytes in `layers` equal layers, each where its state
    puts it (ACTIVE: DEVICE; asleep at level 1: HOST; level 2 or a catalogue
    entry: SOURCE) unless `tiers` says."""
    if tiers is None:
        tier = {
            ModelState.ACTIVE: Tier.DEVICE,
            ModelState.ASLEEP: Tier.HOST if level == 1 else Tier.SOURCE,
            ModelState.UNLOADED: Tier.SOURCE,
        }.get(state, Tier.DEVICE)
        tiers = [tier] * layers
    each = size // len(tiers)
    views = tuple(LayerView(f"layers.{index}", each, tier) for index, tier in enumerate(tiers))
    return ModelView(
        model_id=model_id,
        state=state,
        sleep_level=level,
        device=device,
        layers=views,
        policy=policy or ModelPolicy(),
        activity=act or activity(),
        busy=busy,
        since=since,
        image=image,
        source=source,
        by_caller=by_caller,
    )


def asleep(model_id: str, size: int = GB, level: int = 1, **kwargs: Any) -> ModelView:
    return model(model_id, size, state=ModelState.ASLEEP, level=level, **kwargs)


def entry(model_id: str, size: int = GB, **kwargs: Any) -> ModelView:
    """A catalogue entry: known by its source, not loaded."""
    return model(model_id, size, state=ModelState.UNLOADED, source=f"/models/{model_id}", **kwargs)


def node(
    *models: ModelView,
    device: int = 4 * GB,
    host: int = 8 * GB,
    disk: int | None = None,
    settings: PolicySettings | None = None,
    now: float = NOW,
    devices: Mapping[str, int] | None = None,
    bandwidth: Bandwidth | None = None,
) -> NodeView:
    """A node holding `models`: each pool's use is what they hold in it."""
    capacities = dict(devices or {GPU: device})
    pools = {
        uuid: PoolView(
            uuid,
            capacity,
            sum(m.bytes_in(Tier.DEVICE) for m in models if m.device == uuid and m.loaded),
        )
        for uuid, capacity in capacities.items()
    }
    host_used = sum(m.bytes_in(Tier.HOST) for m in models if m.loaded)
    disk_pool = None
    if disk is not None:
        disk_pool = PoolView("disk", disk, sum(m.bytes_in(Tier.DISK) for m in models))
    return NodeView(
        now=now,
        models=tuple(models),
        devices=pools,
        host=PoolView("host", host, host_used),
        disk=disk_pool,
        settings=settings or PolicySettings(),
        bandwidth=bandwidth or Bandwidth(),
    )


def actions(result: Sequence[Action] | Refusal) -> list[Action]:
    """The actions of a decision that must not be a Refusal."""
    assert not isinstance(result, Refusal), result
    return list(result)


def refusal(result: Sequence[Action] | Refusal) -> Refusal:
    assert isinstance(result, Refusal), result
    return result
