"""make_room on seeded random views: it never touches a model it may not,
its actions run in order within each pool, and they free what was asked."""

from __future__ import annotations

import random

import pytest
from torpord.policies.actions import Offload, Refusal, Sleep
from torpord.policies.decide import make_room
from torpord.policies.settings import EvictionOrder, Granularity, ModelPolicy, PolicySettings
from torpord.policies.view import ModelView, NodeView
from torpord.types import ModelState, Tier

from tests.policies.build import GB, GPU, NOW, activity, model, node

MB = 1 << 20


def random_view(rng: random.Random) -> tuple[NodeView, set[str]]:
    models: list[ModelView] = []
    for index in range(rng.randint(1, 12)):
        state = rng.choice(
            [ModelState.ACTIVE] * 4 + [ModelState.ASLEEP, ModelState.OFFLOADED, ModelState.WAKING]
        )
        layers = rng.randint(1, 6)
        if state is ModelState.OFFLOADED:
            tiers = [rng.choice([Tier.DEVICE, Tier.HOST]) for _ in range(layers)]
        elif state is ModelState.ASLEEP:
            tiers = [Tier.HOST if rng.random() < 0.6 else Tier.SOURCE] * layers
        else:
            tiers = [Tier.DEVICE] * layers
        policy = ModelPolicy(
            pinned=rng.random() < 0.15,
            priority=rng.choice([0, 0, 0, 1, -1]),
            evict_to=rng.choice([Tier.HOST, Tier.DISK, Tier.SOURCE]),
        )
        models.append(
            model(
                f"m{index:02d}",
                rng.randint(1, 40) * 64 * MB * layers,
                state=state,
                level=1 if Tier.HOST in tiers and state is ModelState.ASLEEP else 2,
                tiers=tiers,
                policy=policy,
                act=activity(
                    last_use=NOW - rng.uniform(0, 86400),
                    in_use=1 if rng.random() < 0.15 else 0,
                    uses=rng.randint(0, 100),
                    recent={
                        60.0: rng.randint(0, 3),
                        3600.0: rng.randint(0, 30),
                        86400.0: rng.randint(0, 300),
                    },
                ),
                busy=rng.random() < 0.1,
                image=rng.random() < 0.2,
            )
        )
    device_used = sum(m.bytes_in(Tier.DEVICE) for m in models)
    host_used = sum(m.bytes_in(Tier.HOST) for m in models)
    settings = PolicySettings(
        eviction=rng.choice(list(EvictionOrder)),
        granularity=rng.choice(list(Granularity)),
    )
    view = node(
        *models,
        device=device_used + rng.randint(0, 2) * GB,
        host=host_used + rng.randint(0, 8) * GB,
        disk=rng.choice([None, 0, 4 * GB, 64 * GB]),
        settings=settings,
    )
    keep = {m.model_id for m in models if rng.random() < 0.1}
    return view, keep


def untouchable(view: NodeView, keep: set[str]) -> set[str]:
    return {
        m.model_id
        for m in view.models
        if m.model_id in keep
        or m.policy.pinned
        or m.activity.in_use
        or m.busy
        or m.state.transitional
    }


@pytest.mark.parametrize("seed", range(300))
def test_make_room_is_safe_and_sufficient(seed: int) -> None:
    rng = random.Random(seed)
    view, keep = random_view(rng)
    device_held = sum(m.bytes_in(Tier.DEVICE) for m in view.models)
    needed = rng.randint(1, max(1, device_held + GB))
    result = make_room(view, GPU, needed, keep=keep)
    assert result == make_room(view, GPU, needed, keep=keep)  # deterministic
    if isinstance(result, Refusal):
        assert 0 < result.short <= needed
        assert set(result.blocked) <= {m.model_id for m in view.models}
        return
    forbidden = untouchable(view, keep)
    seen: set[str] = set()
    host_free = view.host.free
    disk_free = view.disk.free if view.disk is not None else None
    freed = 0
    for action in result:
        assert action.model_id not in forbidden, action
        assert action.model_id not in seen, action  # one action a model
        seen.add(action.model_id)
        victim = view.model(action.model_id)
        assert victim is not None
        on_device, in_host = victim.bytes_in(Tier.DEVICE), victim.bytes_in(Tier.HOST)
        if isinstance(action, Offload):
            assert action.tier is Tier.HOST
            moved = sum(layer.size for layer in victim.layers if layer.name in action.layers)
            assert all(
                layer.tier is Tier.DEVICE for layer in victim.layers if layer.name in action.layers
            )
            host_free -= moved
            freed += moved
        else:
            assert isinstance(action, Sleep)
            if victim.image:
                assert action.level == 1 or action.disk_copy
            if action.level == 1:
                assert victim.state is not ModelState.ASLEEP
                host_free -= on_device
            else:
                if action.disk_copy:
                    assert disk_free is not None
                    disk_free -= on_device + in_host
                host_free += in_host
            freed += on_device
        assert host_free >= 0, "an action ran before the host room it needs"
        assert disk_free is None or disk_free >= 0
    assert freed >= needed
