"""A level-1 sleeper pushed down to level 2: when it keeps a disk copy.

Both ways down are checked: making host room (make_room on the host pool)
and the sleeper limits (housekeeping's PRESSURE step).
"""

from __future__ import annotations

from typing import Any

import pytest
from torpord.policies.actions import Action, Sleep
from torpord.policies.decide import housekeeping, make_room
from torpord.policies.settings import ModelPolicy, PolicySettings
from torpord.policies.view import Bandwidth, NodeView
from torpord.types import Cause, ModelState, Tier

from tests.policies.build import GB, NOW, actions, activity, asleep, model, node, refusal, used

PRESSURE, IDLE = Cause.PRESSURE, Cause.IDLE
TO_HOST, TO_SOURCE = ModelPolicy(evict_to=Tier.HOST), ModelPolicy(evict_to=Tier.SOURCE)
ONE_SLEEPER = PolicySettings(max_sleeping_models=1, preload=False)
SLOW_DISK = Bandwidth(disk_to_device=1e9, source_to_device=2e9)
EVEN_DISK = Bandwidth(disk_to_device=2e9, source_to_device=2e9)
SHORT = 2 * GB + GB // 2  # a disk cache of which on-disk (below) leaves GB / 2 free


def room(view: NodeView) -> list[Action]:
    """Make a GiB of host room: the coldest sleeper goes down."""
    return actions(make_room(view, "host", GB))


def limits(view: NodeView) -> list[Action]:
    return list(housekeeping(view))


def two(first: Any, **kwargs: Any) -> NodeView:
    """A cold sleeper `first` (what gets pushed) and a hot one, over the limit."""
    hot = asleep("hot", act=used(30))
    return node(first, hot, host=2 * GB, settings=ONE_SLEEPER, **kwargs)


def cold(model_id: str = "cold", **kwargs: Any) -> Any:
    return asleep(model_id, **{"act": used(0.1), **kwargs})


# -- evict_to = HOST keeps a disk copy when the disk is nearer than its source ------------


def test_making_host_room_keeps_a_disk_copy_of_a_host_lover() -> None:
    view = node(cold(policy=TO_HOST), host=GB, disk=4 * GB)
    assert room(view) == [Sleep("cold", 2, PRESSURE, disk_copy=True)]


def test_the_sleeper_limit_keeps_a_disk_copy_of_a_host_lover() -> None:
    view = two(cold(policy=TO_HOST), disk=4 * GB)
    assert limits(view) == [Sleep("cold", 2, PRESSURE, disk_copy=True)]


def test_a_model_going_idle_past_the_limit_keeps_a_disk_copy() -> None:
    idle = model(
        "idle",
        policy=ModelPolicy(idle_timeout=10, evict_to=Tier.HOST),
        act=activity(last_use=NOW - 100),
    )
    view = node(idle, asleep("hot", act=used(30)), settings=ONE_SLEEPER, disk=4 * GB)
    assert limits(view) == [Sleep("idle", 2, IDLE, disk_copy=True)]


# -- and when it doesn't ---------------------------------------------------------------


@pytest.mark.parametrize("decide", [room, limits])
def test_without_a_disk_cache_it_goes_to_its_source(decide: Any) -> None:
    view = two(cold(policy=TO_HOST)) if decide is limits else node(cold(), host=GB)
    assert decide(view) == [Sleep("cold", 2, PRESSURE)]


@pytest.mark.parametrize("bandwidth", [SLOW_DISK, EVEN_DISK])
@pytest.mark.parametrize("decide", [room, limits])
def test_a_disk_no_faster_than_the_source_gets_no_copy(decide: Any, bandwidth: Bandwidth) -> None:
    if decide is limits:
        view = two(cold(policy=TO_HOST), disk=4 * GB, bandwidth=bandwidth)
    else:
        view = node(cold(policy=TO_HOST), host=GB, disk=4 * GB, bandwidth=bandwidth)
    assert decide(view) == [Sleep("cold", 2, PRESSURE)]


@pytest.mark.parametrize("decide", [room, limits])
def test_evict_to_source_never_keeps_a_disk_copy(decide: Any) -> None:
    if decide is limits:
        view = two(cold(policy=TO_SOURCE), disk=4 * GB)
    else:
        view = node(cold(policy=TO_SOURCE), host=GB, disk=4 * GB)
    assert decide(view) == [Sleep("cold", 2, PRESSURE)]


@pytest.mark.parametrize("decide", [room, limits])
def test_without_disk_room_it_goes_to_its_source_and_evicts_no_disk_entry(decide: Any) -> None:
    # The disk holds another model's copy and half a GiB free.
    on_disk = asleep("on-disk", 2 * GB, level=2, tiers=[Tier.DISK] * 4, act=used(0.01))
    if decide is limits:
        hot = asleep("hot", act=used(30))
        view = node(
            cold(policy=TO_HOST), hot, on_disk, host=2 * GB, settings=ONE_SLEEPER, disk=SHORT
        )
    else:
        view = node(cold(policy=TO_HOST), on_disk, host=GB, disk=SHORT)
    assert view.disk is not None and 0 < view.disk.free < GB
    assert decide(view) == [Sleep("cold", 2, PRESSURE)]


def test_disk_room_is_counted_across_pushdowns() -> None:
    # Room on the disk for one of the two: the colder gets it, the other
    # goes to its source.
    view = node(
        cold("colder", act=used(0.05)),
        cold("cold"),
        asleep("hot", act=used(30)),
        host=3 * GB,
        disk=GB + GB // 2,
        settings=PolicySettings(max_sleeping_models=1, preload=False),
    )
    assert limits(view) == [
        Sleep("colder", 2, PRESSURE, disk_copy=True),
        Sleep("cold", 2, PRESSURE),
    ]
    assert actions(make_room(view, "host", 2 * GB)) == [
        Sleep("colder", 2, PRESSURE, disk_copy=True),
        Sleep("cold", 2, PRESSURE),
    ]


# -- images, unchanged -------------------------------------------------------------------


def test_a_pushed_down_image_keeps_a_disk_copy_or_stays() -> None:
    image = cold(image=True, policy=TO_SOURCE)
    assert room(node(image, host=GB, disk=4 * GB)) == [Sleep("cold", 2, PRESSURE, disk_copy=True)]
    assert limits(two(image, disk=4 * GB)) == [Sleep("cold", 2, PRESSURE, disk_copy=True)]
    # Without disk room the image stays, and the next coldest goes instead.
    assert limits(two(image, disk=GB // 2)) == [Sleep("hot", 2, PRESSURE)]
    assert limits(two(image)) == [Sleep("hot", 2, PRESSURE)]
    refused = refusal(make_room(node(image, host=GB), "host", GB))
    assert dict(refused.blocked) == {"cold": "nowhere to go"}


def test_an_awake_model_is_not_a_pushdown() -> None:
    # The device's evict_to = HOST route is unchanged: level 1 when the host
    # has room (only level-1 sleepers are pushed down).
    view = node(model("awake", policy=TO_HOST), disk=4 * GB)
    assert view.models[0].state is ModelState.ACTIVE
    assert actions(make_room(view, "gpu0", GB)) == [Sleep("awake", 1, PRESSURE)]
