"""A model that wanted level 1 but falls to level 2 for want of host room:
when it keeps a disk copy.

Two ways down besides the push-downs of test_pushdown.py: a device
eviction (make_room on a device, Acquire) of an evict_to = HOST model, and
an IDLE sleep at level 1 that falls back to level 2. Both keep a disk copy
by the push-down's rule (room.disk_copy_wanted), within the disk room the
plan counts, never evicting other disk entries.
"""

from __future__ import annotations

from typing import Any

import pytest
from torpord.policies.actions import Action, Sleep, Wake
from torpord.policies.decide import acquire, housekeeping, make_room
from torpord.policies.settings import ModelPolicy, PolicySettings
from torpord.policies.view import Bandwidth, NodeView
from torpord.types import Cause, ModelState, Tier

from tests.policies.build import GB, GPU, NOW, actions, activity, asleep, model, node, used

PRESSURE, IDLE, ACQUIRE = Cause.PRESSURE, Cause.IDLE, Cause.ACQUIRE
QUIET = PolicySettings(preload=False)
SLOW_DISK = Bandwidth(disk_to_device=1e9, source_to_device=2e9)
EVEN_DISK = Bandwidth(disk_to_device=2e9, source_to_device=2e9)
NO_HOST = GB // 2  # a host pool a GiB model does not fit in
HALF = [Tier.DEVICE, Tier.DEVICE, Tier.HOST, Tier.HOST]  # offloaded: half on the host


def evict(policy: ModelPolicy | None = None, **kwargs: Any) -> list[Action]:
    """Make a GiB of device room where the only victim, "awake", can't go
    to the host."""
    awake = model("awake", policy=policy or ModelPolicy(evict_to=Tier.HOST))
    kwargs = {"host": NO_HOST, **kwargs}
    return actions(make_room(node(awake, *kwargs.pop("others", ()), **kwargs), GPU, GB))


def idle(level: int = 1, evict_to: Tier = Tier.HOST, **kwargs: Any) -> list[Action]:
    """Housekeeping with one idle model, "idle", that has no host room."""
    policy = ModelPolicy(idle_timeout=10, idle_level=level, evict_to=evict_to)
    gone = model("idle", policy=policy, act=activity(last_use=NOW - 100))
    kwargs = {"host": NO_HOST, "settings": QUIET, **kwargs}
    return list(housekeeping(node(gone, *kwargs.pop("others", ()), **kwargs)))


def on_disk(free: int) -> tuple[Any, int]:
    """Another model's disk copy (never evicted for a fallback) and the
    size of a disk cache it leaves `free` bytes of."""
    entry = asleep("on-disk", 2 * GB, level=2, tiers=[Tier.DISK] * 4, act=used(0.01))
    return entry, 2 * GB + free


# -- a device eviction with no host room -------------------------------------------------


def test_a_device_victim_with_no_host_room_keeps_a_disk_copy() -> None:
    assert evict(disk=4 * GB) == [Sleep("awake", 2, PRESSURE, disk_copy=True)]


@pytest.mark.parametrize("bandwidth", [SLOW_DISK, EVEN_DISK])
def test_a_device_victim_gets_no_copy_on_a_disk_no_faster_than_its_source(
    bandwidth: Bandwidth,
) -> None:
    assert evict(disk=4 * GB, bandwidth=bandwidth) == [Sleep("awake", 2, PRESSURE)]


def test_a_device_victim_without_a_disk_cache_goes_to_its_source() -> None:
    assert evict() == [Sleep("awake", 2, PRESSURE)]


def test_a_device_victim_evicted_to_its_source_never_keeps_a_copy() -> None:
    assert evict(ModelPolicy(evict_to=Tier.SOURCE), disk=4 * GB) == [Sleep("awake", 2, PRESSURE)]


def test_a_device_victim_with_host_room_still_sleeps_at_level_1() -> None:
    assert evict(disk=4 * GB, host=4 * GB) == [Sleep("awake", 1, PRESSURE)]


def test_host_room_made_by_a_push_down_still_comes_before_the_disk() -> None:
    # The host holds a colder level-1 sleeper: it goes down (with its own
    # disk copy), and the victim gets its place at level 1.
    sleeper = asleep("sleeper", act=used(0.01))
    assert evict(disk=4 * GB, host=GB, others=[sleeper]) == [
        Sleep("sleeper", 2, PRESSURE, disk_copy=True),
        Sleep("awake", 1, PRESSURE),
    ]


def test_a_device_victims_copy_takes_exactly_its_bytes_of_disk_room() -> None:
    # Offloaded: half its bytes on the device, half on the host; the copy
    # holds both. Exactly its size free: a copy; a byte less: none, and the
    # other model's copy stays.
    half = ModelPolicy(evict_to=Tier.HOST)
    offloaded = model("awake", state=ModelState.OFFLOADED, tiers=HALF, policy=half)
    for free, copy in [(GB, True), (GB - 1, False)]:
        entry, disk = on_disk(free)
        view = node(offloaded, entry, host=GB // 2, disk=disk)
        assert view.disk is not None and view.disk.free == free
        assert actions(make_room(view, GPU, GB // 2)) == [
            Sleep("awake", 2, PRESSURE, disk_copy=copy)
        ]


def test_disk_room_is_counted_across_device_victims() -> None:
    # Room on the disk for one of the two: the first to go (the colder)
    # takes it, the other goes to its source.
    view = node(
        model("colder", act=used(0.05)),
        model("cold", act=used(0.1)),
        host=NO_HOST,
        disk=GB + GB // 2,
    )
    assert actions(make_room(view, GPU, 2 * GB)) == [
        Sleep("colder", 2, PRESSURE, disk_copy=True),
        Sleep("cold", 2, PRESSURE),
    ]


def test_an_acquire_swapping_a_host_sleeper_in_keeps_the_victims_copy() -> None:
    # The host is full with the sleeper being woken: the victim can't go
    # there (the sleeper's bytes leave only with its Wake).
    view = node(
        model("awake", act=used(0.1)),
        asleep("wanted", act=used(30)),
        device=GB,
        host=GB,
        disk=4 * GB,
    )
    assert actions(acquire(view, "wanted")) == [
        Sleep("awake", 2, PRESSURE, disk_copy=True),
        Wake("wanted", ACQUIRE),
    ]


def test_an_image_victim_is_unchanged() -> None:
    image = model("img", image=True)
    assert actions(make_room(node(image, host=NO_HOST, disk=4 * GB), GPU, GB)) == [
        Sleep("img", 2, PRESSURE, disk_copy=True)
    ]


# -- an idle sleep at level 1 with no host room ------------------------------------------


def test_an_idle_model_falling_to_level_2_keeps_a_disk_copy() -> None:
    assert idle(disk=4 * GB) == [Sleep("idle", 2, IDLE, disk_copy=True)]


@pytest.mark.parametrize("bandwidth", [SLOW_DISK, EVEN_DISK])
def test_an_idle_fallback_gets_no_copy_on_a_disk_no_faster_than_its_source(
    bandwidth: Bandwidth,
) -> None:
    assert idle(disk=4 * GB, bandwidth=bandwidth) == [Sleep("idle", 2, IDLE)]


def test_an_idle_fallback_evicted_to_its_source_never_keeps_a_copy() -> None:
    assert idle(evict_to=Tier.SOURCE, disk=4 * GB) == [Sleep("idle", 2, IDLE)]


def test_an_idle_fallback_without_a_disk_cache_goes_to_its_source() -> None:
    assert idle() == [Sleep("idle", 2, IDLE)]


def test_an_idle_fallbacks_copy_takes_exactly_its_bytes_of_disk_room() -> None:
    for free, copy in [(GB, True), (GB - 1, False)]:
        entry, disk = on_disk(free)
        assert idle(disk=disk, others=[entry]) == [Sleep("idle", 2, IDLE, disk_copy=copy)]


def test_idle_fallbacks_share_the_disk_room_likeliest_first() -> None:
    # Both fall back; the disk has room for one: the likelier (handled
    # first, as for host room) keeps the copy.
    policy = ModelPolicy(idle_timeout=10, evict_to=Tier.HOST)
    # (named so that the model id order, the tie-break, is the other way)
    likely = activity(last_use=NOW - 100, recent={86400.0: 48})
    likelier = model("likelier", policy=policy, act=likely)
    another = model("another", policy=policy, act=activity(last_use=NOW - 100))
    view = node(another, likelier, host=NO_HOST, disk=GB + GB // 2, settings=QUIET)
    assert list(housekeeping(view)) == [
        Sleep("likelier", 2, IDLE, disk_copy=True),
        Sleep("another", 2, IDLE),
    ]


def test_an_idle_level_of_2_with_evict_to_host_keeps_no_copy() -> None:
    # The owner's choice to let it go cold when idle: evict_to HOST is
    # where evictions go, not a wish for a disk copy (evict_to DISK is).
    assert idle(level=2, disk=4 * GB) == [Sleep("idle", 2, IDLE)]
    assert idle(level=2, evict_to=Tier.DISK, disk=4 * GB) == [
        Sleep("idle", 2, IDLE, disk_copy=True)
    ]


def test_an_idle_model_with_host_room_still_sleeps_at_level_1() -> None:
    assert idle(disk=4 * GB, host=4 * GB) == [Sleep("idle", 1, IDLE)]


def test_an_idle_view_with_room_for_level_1_is_no_fallback() -> None:
    # Level 1 made by pushing a colder sleeper down: no fallback at all.
    sleeper = asleep("sleeper", act=activity(last_use=NOW - 86400))
    recent = activity(last_use=NOW - 100, recent={86400.0: 48})
    view: NodeView = node(
        model("idle", policy=ModelPolicy(idle_timeout=10), act=recent),
        sleeper,
        host=GB,
        disk=4 * GB,
        settings=QUIET,
    )
    assert list(housekeeping(view)) == [
        Sleep("sleeper", 2, PRESSURE, disk_copy=True),
        Sleep("idle", 1, IDLE),
    ]
