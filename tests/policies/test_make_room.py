"""make_room: which models go, where, in what order, and why not."""

from __future__ import annotations

import pytest
from torpord.errors import InvalidArgument
from torpord.policies.actions import Offload, Sleep
from torpord.policies.decide import make_room
from torpord.policies.settings import EvictionOrder, Granularity, ModelPolicy, PolicySettings
from torpord.types import Cause, ModelState, Tier

from tests.policies.build import (
    GB,
    GPU,
    NOW,
    actions,
    activity,
    asleep,
    model,
    node,
    refusal,
    used,
)

PRESSURE = Cause.PRESSURE


def evicted(result: object) -> list[str]:
    return [action.model_id for action in actions(result)]  # type: ignore[arg-type]


def ordered(order: EvictionOrder) -> PolicySettings:
    return PolicySettings(eviction=order)


# -- the orders ---------------------------------------------------------------


def test_lru_evicts_the_least_recently_used() -> None:
    view = node(
        model("a", act=activity(last_use=NOW - 10, uses=100)),
        model("b", act=activity(last_use=NOW - 500, uses=100)),
        model("c", act=activity(last_use=NOW - 50, uses=1)),
        settings=ordered(EvictionOrder.LRU),
    )
    assert actions(make_room(view, GPU, GB)) == [Sleep("b", 1, PRESSURE)]
    assert evicted(make_room(view, GPU, 2 * GB)) == ["b", "c"]


def test_lru_counts_a_model_just_woken_as_fresh() -> None:
    view = node(
        model("woken", act=activity(last_use=NOW - 900), since=NOW - 5),
        model("stale", act=activity(last_use=NOW - 100), since=NOW - 1000),
        settings=ordered(EvictionOrder.LRU),
    )
    assert evicted(make_room(view, GPU, GB)) == ["stale"]


def test_lfu_evicts_the_least_used_then_the_least_recent() -> None:
    view = node(
        model("many", act=activity(last_use=NOW - 900, uses=50)),
        model("few-old", act=activity(last_use=NOW - 800, uses=3)),
        model("few-new", act=activity(last_use=NOW - 10, uses=3)),
        settings=ordered(EvictionOrder.LFU),
    )
    assert evicted(make_room(view, GPU, 2 * GB)) == ["few-old", "few-new"]


def test_cost_keeps_what_is_likely_used_soon() -> None:
    view = node(
        model("hot", act=used(60)),
        model("warm", act=used(5)),
        model("cold", act=used(0.5)),
    )
    assert evicted(make_room(view, GPU, GB)) == ["cold"]
    assert evicted(make_room(view, GPU, 2 * GB)) == ["cold", "warm"]


def test_cost_keeps_what_is_dear_to_bring_back() -> None:
    # Used alike; one would go to the host (fast back), one to its source.
    view = node(
        model("to-source", act=used(5), policy=ModelPolicy(evict_to=Tier.SOURCE)),
        model("to-host", act=used(5), policy=ModelPolicy(evict_to=Tier.HOST)),
    )
    assert evicted(make_room(view, GPU, GB)) == ["to-host"]


def test_cost_weighs_likelihood_against_the_cost_of_coming_back() -> None:
    # Five times as likely, but to a tier ten times as fast (host 20 GB/s,
    # source 2 GB/s): evicting the hot one costs half the expected waiting.
    view = node(
        model("cold-source", act=used(4), policy=ModelPolicy(evict_to=Tier.SOURCE)),
        model("hot-host", act=used(20), policy=ModelPolicy(evict_to=Tier.HOST)),
    )
    assert evicted(make_room(view, GPU, GB)) == ["hot-host"]


def test_cost_does_not_evict_more_than_it_needs() -> None:
    # The cheapest bytes are the small cold model's, but the big one must go
    # anyway: the small one stays.
    view = node(
        model("small-cold", GB, act=used(0.5)),
        model("big-cool", 3 * GB, act=used(1)),
        device=4 * GB,
    )
    assert evicted(make_room(view, GPU, 3 * GB)) == ["big-cool"]


@pytest.mark.parametrize("order", list(EvictionOrder))
def test_priority_comes_before_every_order(order: EvictionOrder) -> None:
    view = node(
        model("cold-important", act=activity(last_use=NOW - 5000), policy=ModelPolicy(priority=5)),
        model("hot-minor", act=used(100), policy=ModelPolicy(priority=-1)),
        model("plain", act=used(1)),
        settings=ordered(order),
    )
    assert evicted(make_room(view, GPU, 2 * GB)) == ["hot-minor", "plain"]


# -- what is never evicted ------------------------------------------------------


def test_pinned_in_use_busy_and_asked_for_are_never_chosen_and_named() -> None:
    view = node(
        model("pinned", policy=ModelPolicy(pinned=True)),
        model("in-use", act=activity(in_use=1)),
        model("busy", busy=True),
        model("asked"),
        model("free"),
        device=5 * GB,
    )
    assert evicted(make_room(view, GPU, GB, keep={"asked"})) == ["free"]
    why = refusal(make_room(view, GPU, 2 * GB, keep={"asked"}))
    assert why.pool == GPU and why.needed == 2 * GB and why.short == GB
    assert dict(why.blocked) == {
        "asked": "asked for",
        "busy": "in transition",
        "in-use": "in use",
        "pinned": "pinned",
    }


def test_a_model_in_a_transitional_state_is_in_transition() -> None:
    view = node(model("waking", state=ModelState.WAKING), model("ok"))
    why = refusal(make_room(view, GPU, 2 * GB))
    assert dict(why.blocked) == {"waking": "in transition"}
    assert why.short == GB


def test_other_devices_models_are_not_candidates() -> None:
    view = node(
        model("here", device="gpu0"),
        model("there", device="gpu1", act=activity(last_use=1)),
        devices={"gpu0": 2 * GB, "gpu1": 2 * GB},
    )
    assert evicted(make_room(view, "gpu0", GB)) == ["here"]


def test_nothing_needed_is_nothing_to_do() -> None:
    view = node(model("a"))
    assert actions(make_room(view, GPU, 0)) == []
    assert actions(make_room(view, GPU, -5)) == []


def test_an_unknown_pool_is_a_clear_error() -> None:
    with pytest.raises(InvalidArgument) as raised:
        make_room(node(model("a")), "gpu9", GB)
    assert raised.value.reason == "UNKNOWN_DEVICE"


# -- where evicted models go -------------------------------------------------------


def test_evict_to_decides_the_sleep() -> None:
    view = node(
        model("h", policy=ModelPolicy(evict_to=Tier.HOST), act=used(1)),
        model("d", policy=ModelPolicy(evict_to=Tier.DISK), act=used(1)),
        model("s", policy=ModelPolicy(evict_to=Tier.SOURCE), act=used(1)),
        disk=10 * GB,
        device=3 * GB,
    )
    got = set(actions(make_room(view, GPU, 3 * GB)))
    assert got == {
        Sleep("h", 1, PRESSURE),
        Sleep("d", 2, PRESSURE, disk_copy=True),
        Sleep("s", 2, PRESSURE),
    }


def test_disk_without_a_disk_cache_or_room_goes_to_the_source() -> None:
    disk = ModelPolicy(evict_to=Tier.DISK)
    assert actions(make_room(node(model("d", policy=disk)), GPU, GB)) == [Sleep("d", 2, PRESSURE)]
    full = node(model("d", 2 * GB, policy=disk), disk=GB)
    assert actions(make_room(full, GPU, GB)) == [Sleep("d", 2, PRESSURE)]


def test_an_image_never_goes_to_its_source() -> None:
    source = ModelPolicy(evict_to=Tier.SOURCE)
    with_disk = node(model("img", image=True, policy=source), disk=4 * GB)
    assert actions(make_room(with_disk, GPU, GB)) == [Sleep("img", 2, PRESSURE, disk_copy=True)]
    without = node(model("img", image=True, policy=source))
    assert actions(make_room(without, GPU, GB)) == [Sleep("img", 1, PRESSURE)]


def test_an_image_with_no_room_anywhere_is_named() -> None:
    view = node(
        model("img", image=True, policy=ModelPolicy(evict_to=Tier.DISK)),
        host=0,
        disk=0,
    )
    why = refusal(make_room(view, GPU, GB))
    assert dict(why.blocked) == {"img": "nowhere to go"}
    assert why.short == GB


def test_host_room_is_made_by_pushing_the_coldest_sleepers_down_first() -> None:
    view = node(
        model("victim", 2 * GB, act=used(1)),
        asleep("hot-sleeper", 2 * GB, act=used(30)),
        asleep("cold-sleeper", 2 * GB, act=used(0.1)),
        host=5 * GB,  # one free
    )
    assert actions(make_room(view, GPU, 2 * GB)) == [
        Sleep("cold-sleeper", 2, PRESSURE),
        Sleep("victim", 1, PRESSURE),
    ]


def test_pushed_down_images_and_disk_lovers_keep_a_disk_copy() -> None:
    view = node(
        model("victim", 2 * GB, act=used(1)),
        asleep("img", GB, act=used(0.1), image=True),
        asleep("disky", GB, act=used(0.2), policy=ModelPolicy(evict_to=Tier.DISK)),
        host=2 * GB,
        disk=8 * GB,
    )
    assert actions(make_room(view, GPU, 2 * GB)) == [
        Sleep("img", 2, PRESSURE, disk_copy=True),
        Sleep("disky", 2, PRESSURE, disk_copy=True),
        Sleep("victim", 1, PRESSURE),
    ]


def test_when_the_host_cannot_take_it_the_model_goes_to_level_2() -> None:
    view = node(
        model("victim", 2 * GB, act=used(1)),
        asleep("pinned-sleeper", GB, policy=ModelPolicy(pinned=True)),
        host=GB,
    )
    assert actions(make_room(view, GPU, GB)) == [Sleep("victim", 2, PRESSURE)]


def test_making_host_room_pushes_level_1_sleepers_down() -> None:
    view = node(
        asleep("a", 2 * GB, act=used(5)),
        asleep("b", 2 * GB, act=used(0.5)),
        asleep("pinned", 2 * GB, policy=ModelPolicy(pinned=True)),
        asleep("deep", 2 * GB, level=2),
    )
    assert actions(make_room(view, "host", GB)) == [Sleep("b", 2, PRESSURE)]
    why = refusal(make_room(view, "host", 5 * GB))
    assert dict(why.blocked) == {"pinned": "pinned"} and why.short == GB


def test_an_offloaded_models_host_layers_go_with_it_to_level_2() -> None:
    half = [Tier.DEVICE, Tier.DEVICE, Tier.HOST, Tier.HOST]
    view = node(
        model(
            "half",
            2 * GB,
            state=ModelState.OFFLOADED,
            tiers=half,
            policy=ModelPolicy(evict_to=Tier.SOURCE),
        ),
        asleep("sleeper", GB, act=used(0.1)),
        host=2 * GB,  # full: the sleeper and half's host layers
    )
    # Freeing the host pushes the sleeper down (half is awake: not a sleeper)...
    assert actions(make_room(view, "host", GB)) == [Sleep("sleeper", 2, PRESSURE)]
    # ...and evicting half to its source drops its host layers as well.
    assert actions(make_room(view, GPU, GB)) == [Sleep("half", 2, PRESSURE)]


# -- layers ---------------------------------------------------------------------------


def test_layers_granularity_offloads_just_enough_last_layers_to_host() -> None:
    settings = PolicySettings(granularity=Granularity.LAYERS)
    view = node(model("a", 4 * GB, layers=4, act=used(1)), device=4 * GB, settings=settings)
    assert actions(make_room(view, GPU, GB + 1)) == [
        Offload("a", ("layers.2", "layers.3"), Tier.HOST, PRESSURE)
    ]
    assert actions(make_room(view, GPU, GB)) == [Offload("a", ("layers.3",), Tier.HOST, PRESSURE)]


def test_layers_granularity_evicts_whole_models_before_the_last_one() -> None:
    settings = PolicySettings(granularity=Granularity.LAYERS, eviction=EvictionOrder.LRU)
    view = node(
        model("old", 2 * GB, layers=2, act=activity(last_use=NOW - 100)),
        model("new", 2 * GB, layers=2, act=activity(last_use=NOW - 10)),
        settings=settings,
    )
    assert actions(make_room(view, GPU, 3 * GB)) == [
        Sleep("old", 1, PRESSURE),
        Offload("new", ("layers.1",), Tier.HOST, PRESSURE),
    ]


def test_layers_already_off_the_device_are_skipped() -> None:
    settings = PolicySettings(granularity=Granularity.LAYERS)
    tiers = [Tier.DEVICE, Tier.DEVICE, Tier.DEVICE, Tier.HOST]
    view = node(model("a", 4 * GB, state=ModelState.OFFLOADED, tiers=tiers), settings=settings)
    assert actions(make_room(view, GPU, GB)) == [Offload("a", ("layers.2",), Tier.HOST, PRESSURE)]


# -- determinism ----------------------------------------------------------------------


@pytest.mark.parametrize("order", list(EvictionOrder))
def test_ties_are_broken_by_model_id(order: EvictionOrder) -> None:
    names = ["m3", "m1", "m4", "m2"]
    view = node(*(model(name) for name in names), settings=ordered(order))
    reverse = node(*(model(name) for name in reversed(names)), settings=ordered(order))
    first = actions(make_room(view, GPU, 2 * GB))
    assert (
        first == actions(make_room(reverse, GPU, 2 * GB)) == actions(make_room(view, GPU, 2 * GB))
    )
    assert [a.model_id for a in first] == ["m1", "m2"]
