"""housekeeping: idle sleep, sleeper limits, windows and preloading."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from torpord.policies.actions import Load, Sleep, Wake
from torpord.policies.decide import housekeeping
from torpord.policies.schedule import warm
from torpord.policies.settings import ModelPolicy, PolicySettings, Window
from torpord.policies.view import ModelView
from torpord.types import Cause, ModelState, Tier

from tests.policies.build import GB, NOW, activity, asleep, entry, model, node, used

IDLE, PRESSURE, SCHEDULE, PRELOAD = Cause.IDLE, Cause.PRESSURE, Cause.SCHEDULE, Cause.PRELOAD
QUIET = PolicySettings(preload=False)
MONDAY = 4 * 86400.0 + 2000 * 7 * 86400.0  # a Monday 00:00 UTC, some years on
WEEK = 7 * 86400.0


def idle_after(seconds: float, level: int = 1, **kwargs: Any) -> ModelPolicy:
    return ModelPolicy(idle_timeout=seconds, idle_level=level, **kwargs)


# -- idle ---------------------------------------------------------------------------


def test_a_model_sleeps_exactly_when_its_idle_timeout_has_passed() -> None:
    def at(last_use: float) -> list[object]:
        view = node(
            model("a", policy=idle_after(300), act=activity(last_use=last_use)), settings=QUIET
        )
        return list(housekeeping(view))

    assert at(NOW - 300) == [Sleep("a", 1, IDLE)]
    assert at(NOW - 299.999) == []


def test_idle_time_counts_from_the_state_when_never_used() -> None:
    def since(when: float) -> list[object]:
        view = node(model("a", policy=idle_after(60), since=when), settings=QUIET)
        return list(housekeeping(view))

    assert since(NOW - 60) == [Sleep("a", 1, IDLE)]
    assert since(NOW - 59) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"policy": ModelPolicy(idle_timeout=0)},
        {"policy": idle_after(10, pinned=True)},
        {"policy": idle_after(10), "act": activity(in_use=1)},
        {"policy": idle_after(10), "busy": True},
        {"policy": idle_after(10), "state": ModelState.WAKING},
    ],
    ids=["no-timeout", "pinned", "in-use", "busy", "waking"],
)
def test_idle_sleep_leaves_these_alone(kwargs: dict[str, Any]) -> None:
    view = node(model("a", **kwargs), settings=QUIET)
    assert list(housekeeping(view)) == []


def test_idle_level_2_and_disk_copies() -> None:
    deep = idle_after(10, level=2)
    disky = idle_after(10, level=2, evict_to=Tier.DISK)
    view = node(
        model("plain", policy=deep),
        model("img", policy=deep, image=True),
        model("disky", policy=disky),
        disk=10 * GB,
        settings=QUIET,
    )
    assert set(housekeeping(view)) == {
        Sleep("plain", 2, IDLE),
        Sleep("img", 2, IDLE, disk_copy=True),
        Sleep("disky", 2, IDLE, disk_copy=True),
    }


def test_an_image_without_a_disk_sleeps_at_level_1() -> None:
    view = node(model("img", policy=idle_after(10, level=2), image=True), settings=QUIET)
    assert list(housekeeping(view)) == [Sleep("img", 1, IDLE)]


def test_idle_level_1_pushes_colder_sleepers_down_for_host_room() -> None:
    view = node(
        model(
            "idle",
            2 * GB,
            policy=idle_after(10),
            act=activity(last_use=NOW - 100, recent={86400.0: 48}),
        ),
        asleep("colder", 2 * GB),
        host=2 * GB,
        settings=QUIET,
    )
    assert list(housekeeping(view)) == [Sleep("colder", 2, PRESSURE), Sleep("idle", 1, IDLE)]


def test_idle_level_1_goes_deeper_rather_than_push_a_likelier_sleeper() -> None:
    view = node(
        model("idle", 2 * GB, policy=idle_after(10), act=activity(last_use=NOW - 100)),
        asleep("likelier", 2 * GB, act=used(20)),
        host=2 * GB,
        settings=QUIET,
    )
    assert list(housekeeping(view)) == [Sleep("idle", 2, IDLE)]


# -- sleeper limits ------------------------------------------------------------------


def test_max_sleeping_models_pushes_the_coldest_down() -> None:
    view = node(
        asleep("hot", act=used(30)),
        asleep("cold", act=used(0.1)),
        asleep("warm", act=used(5)),
        asleep("pinned", policy=ModelPolicy(pinned=True)),
        asleep("deep", level=2),
        settings=PolicySettings(max_sleeping_models=2, preload=False),
    )
    assert list(housekeeping(view)) == [Sleep("cold", 2, PRESSURE), Sleep("warm", 2, PRESSURE)]


def test_a_model_going_idle_past_the_limit_sleeps_deeper_at_once() -> None:
    view = node(
        model("idle", policy=idle_after(10), act=activity(last_use=NOW - 100)),
        asleep("hot", act=used(30)),
        settings=PolicySettings(max_sleeping_models=1, preload=False),
    )
    assert list(housekeeping(view)) == [Sleep("idle", 2, IDLE)]


def test_host_limit_pushes_sleepers_down_until_it_holds() -> None:
    view = node(
        asleep("a", 2 * GB, act=used(3)),
        asleep("b", 2 * GB, act=used(1)),
        asleep("c", 2 * GB, act=used(2)),
        settings=PolicySettings(host_limit=3 * GB, preload=False),
    )
    assert list(housekeeping(view)) == [Sleep("b", 2, PRESSURE), Sleep("c", 2, PRESSURE)]


# -- windows ----------------------------------------------------------------------------

SUNDAY_NIGHT = Window(start=6 * 86400 + 23 * 3600, end=3600, tier=Tier.HOST, lead=300)


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (-3600 - 301, False),  # Sunday 22:54:59
        (-3600 - 300, True),  # Sunday 22:55: the lead
        (-1, True),
        (0, True),  # Monday 00:00: past the week's end
        (3599, True),
        (3600, False),  # Monday 01:00: closed
        (3 * 86400, False),
    ],
)
def test_a_window_wraps_past_the_weeks_end(offset: float, expected: bool) -> None:
    assert warm(SUNDAY_NIGHT, MONDAY + offset) is expected
    assert warm(SUNDAY_NIGHT, MONDAY + WEEK * 3 + offset) is expected


def test_a_window_loads_a_catalogue_entry_to_the_host_before_it_opens() -> None:
    policy = ModelPolicy(windows=(SUNDAY_NIGHT,))
    view = node(entry("nightly", policy=policy), now=MONDAY - 3600 - 60, settings=QUIET)
    assert list(housekeeping(view)) == [Load("nightly", "/models/nightly", Tier.HOST, SCHEDULE)]
    assert list(housekeeping(node(entry("nightly", policy=policy), now=MONDAY - 7200))) == []


def test_a_host_window_reads_a_level_2_sleeper_back_to_the_host() -> None:
    policy = ModelPolicy(windows=(SUNDAY_NIGHT,))
    at = MONDAY - 3600 - 60

    def decide(*others: ModelView, host: int = 8 * GB) -> list[object]:
        sleeper = asleep("nightly", 2 * GB, level=2, policy=policy)
        return list(housekeeping(node(sleeper, *others, host=host, now=at, settings=QUIET)))

    assert decide() == [Sleep("nightly", 1, SCHEDULE)]
    # Host room is made by pushing down a less likely sleeper, never a likelier one.
    cold = asleep("cold", 2 * GB, act=activity(last_use=at - 5000))
    assert decide(cold, host=2 * GB) == [Sleep("cold", 2, PRESSURE), Sleep("nightly", 1, SCHEDULE)]
    assert decide(asleep("hot", 2 * GB, act=used(100)), host=2 * GB) == []
    # Outside the window nothing moves; a level-1 sleeper is warm enough.
    view = node(asleep("nightly", 2 * GB, level=2, policy=policy), now=MONDAY - 7200)
    assert list(housekeeping(view)) == []
    view = node(asleep("nightly", 2 * GB, policy=policy), now=at, settings=QUIET)
    assert list(housekeeping(view)) == []


def test_a_device_window_wakes_by_evicting_only_less_likely_idle_models() -> None:
    window = Window(start=9 * 3600, end=17 * 3600, tier=Tier.DEVICE, lead=600)
    policy = ModelPolicy(windows=(window,))
    at = MONDAY + 9 * 3600 - 60

    def decide(other: ModelView) -> list[object]:
        view = node(
            asleep("office", 2 * GB, policy=policy), other, device=2 * GB, now=at, settings=QUIET
        )
        return list(housekeeping(view))

    assert decide(model("cold", 2 * GB, act=activity(last_use=at - 5000))) == [
        Sleep("cold", 1, PRESSURE),
        Wake("office", SCHEDULE),
    ]
    assert decide(model("busy", 2 * GB, act=activity(in_use=1))) == []
    assert decide(model("hot", 2 * GB, act=used(100))) == []


def test_a_device_window_keeps_its_model_awake() -> None:
    window = Window(start=0, end=86400, tier=Tier.DEVICE)
    policy = ModelPolicy(idle_timeout=10, windows=(window,))
    view = node(
        model("a", policy=policy, act=activity(last_use=MONDAY - 999)), now=MONDAY, settings=QUIET
    )
    assert list(housekeeping(view)) == []


# -- preloading ---------------------------------------------------------------------------


def test_preloading_loads_likely_catalogue_entries_to_the_host() -> None:
    view = node(
        entry("likely", act=activity(recent={60.0: 2, 3600.0: 3, 86400.0: 3})),
        entry("stray", act=activity(recent={3600.0: 1, 86400.0: 1})),
        entry("never"),
    )
    assert list(housekeeping(view)) == [Load("likely", "/models/likely", Tier.HOST, PRELOAD)]


def test_the_preload_threshold_is_a_setting() -> None:
    likely = entry("likely", act=activity(recent={60.0: 2, 3600.0: 3, 86400.0: 3}))  # ~41/h
    stray = entry("stray", act=activity(recent={3600.0: 1, 86400.0: 1}))  # ~0.5/h
    picky = PolicySettings(preload_min_uses=100.0)
    assert list(housekeeping(node(likely, stray, settings=picky))) == []
    eager = PolicySettings(preload_min_uses=0.1)
    assert [a.model_id for a in housekeeping(node(likely, stray, settings=eager))] == [
        "likely",
        "stray",
    ]


def test_preloading_never_loads_more_than_fits_likeliest_first() -> None:
    view = node(
        entry("a", 3 * GB, act=used(10)),
        entry("b", 3 * GB, act=used(20)),
        entry("c", GB, act=used(5)),
        host=8 * GB,  # (4 GB of it kept for the device's evictions)
    )
    assert list(housekeeping(view)) == [
        Load("b", "/models/b", Tier.HOST, PRELOAD),
        Load("c", "/models/c", Tier.HOST, PRELOAD),
    ]


def test_preloading_never_wakes_a_sleeper() -> None:
    # Used ten times an hour, with the device free: a caller's Sleep still holds.
    view = node(asleep("s", 2 * GB, act=used(10)), model("cold", 2 * GB), device=4 * GB)
    assert list(housekeeping(view)) == []
    offloaded = node(asleep("s", 2 * GB, act=used(10)), device=8 * GB)
    assert all(not isinstance(a, Wake) for a in housekeeping(offloaded))


def test_preloading_reads_a_level_2_sleeper_back_to_the_host() -> None:
    view = node(asleep("s", 2 * GB, level=2, act=used(10)), asleep("cold", 2 * GB, level=2))
    assert list(housekeeping(view)) == [Sleep("s", 1, PRELOAD)]


def test_preloading_keeps_the_host_room_the_devices_evictions_take() -> None:
    wanted = (asleep("s", 2 * GB, level=2, act=used(10)), entry("e", 2 * GB, act=used(5)))
    # 7 GB free, 4 GB of device: room beyond it for one of the two.
    assert list(housekeeping(node(*wanted, device=4 * GB, host=7 * GB))) == [Sleep("s", 1, PRELOAD)]
    assert list(housekeeping(node(*wanted, device=7 * GB, host=8 * GB))) == []


def test_a_catalogue_entry_of_unknown_size_gets_no_action() -> None:
    unknown = dataclasses.replace(
        entry("e", 0, act=used(10), policy=ModelPolicy(windows=(Window(0, 0, Tier.DEVICE),))),
        layers=(),
        sized=False,
    )
    assert list(housekeeping(node(unknown))) == []
    host_window = ModelPolicy(windows=(Window(0, 0, Tier.HOST),))
    assert list(housekeeping(node(dataclasses.replace(unknown, policy=host_window)))) == []


def test_preloading_counts_the_sleepers_this_round_makes() -> None:
    view = node(
        model("idle", policy=idle_after(1)),
        entry("e", act=used(10)),
        settings=PolicySettings(max_sleeping_models=1),
    )
    assert list(housekeeping(view)) == [Sleep("idle", 1, IDLE)]


def test_preloading_respects_the_sleeper_limits() -> None:
    view = node(
        entry("e", act=used(10)),
        asleep("s", act=used(100)),
        device=0,
        settings=PolicySettings(max_sleeping_models=1),
    )
    assert list(housekeeping(view)) == []


def test_off_switches() -> None:
    wanted = node(entry("e", act=used(10)), model("idle", policy=idle_after(1)))
    assert list(housekeeping(node(*wanted.models, settings=PolicySettings(enabled=False)))) == []
    assert list(housekeeping(node(*wanted.models, settings=QUIET))) == [Sleep("idle", 1, IDLE)]


def test_pinned_models_are_never_touched() -> None:
    pinned = ModelPolicy(pinned=True, idle_timeout=1, windows=(Window(0, 0, Tier.DEVICE),))
    view = node(
        entry("e", act=used(10), policy=pinned),
        asleep("s", act=used(10), policy=pinned),
        settings=PolicySettings(max_sleeping_models=1),
    )
    assert list(housekeeping(view)) == []


def test_the_same_view_gives_the_same_actions() -> None:
    models = [
        model("i1", policy=idle_after(5), act=activity(last_use=NOW - 50)),
        model("i2", policy=idle_after(5), act=activity(last_use=NOW - 50)),
        asleep("s1", act=used(1)),
        asleep("s2", act=used(1)),
        entry("e1", act=used(10)),
        entry("e2", act=used(10)),
    ]
    settings = PolicySettings(max_sleeping_models=2)
    first = list(housekeeping(node(*models, settings=settings, host=3 * GB)))
    again = list(housekeeping(node(*reversed(models), settings=settings, host=3 * GB)))
    assert first == again and first


def test_preloading_leaves_a_callers_level_2_sleep_alone() -> None:
    # A caller slept it at level 2 to free host memory: the history says it
    # will be wanted, but only the caller (or a request) brings it back.
    view = node(asleep("s", 2 * GB, level=2, act=used(10), by_caller=True))
    assert list(housekeeping(view)) == []
