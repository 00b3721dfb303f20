"""acquire: what makes a model ready, and when it can't be."""

from __future__ import annotations

import pytest
from torpord.errors import FailedPrecondition, NotFound
from torpord.policies.actions import Load, Sleep, Wake
from torpord.policies.decide import acquire
from torpord.policies.settings import ModelPolicy
from torpord.types import Cause, ModelState, Tier

from tests.policies.build import GB, actions, activity, asleep, entry, model, node, refusal, used

ACQUIRE, PRESSURE = Cause.ACQUIRE, Cause.PRESSURE


def test_an_active_model_needs_nothing() -> None:
    assert actions(acquire(node(model("a")), "a")) == []


@pytest.mark.parametrize("state", [ModelState.WAKING, ModelState.LOADING, ModelState.SLEEPING])
def test_a_model_in_a_transition_is_waited_for(state: ModelState) -> None:
    assert actions(acquire(node(model("a", state=state)), "a")) == []


def test_a_busy_sleeper_is_waited_for() -> None:
    assert actions(acquire(node(asleep("a", busy=True)), "a")) == []


def test_a_sleeper_that_fits_is_woken() -> None:
    view = node(asleep("a", 2 * GB), model("b"), device=3 * GB)
    assert actions(acquire(view, "a")) == [Wake("a", ACQUIRE)]


def test_a_sleeper_that_does_not_fit_gets_room_first() -> None:
    view = node(
        asleep("a", 2 * GB),
        model("hot", act=used(50)),
        model("cold", act=used(0.5)),
        device=3 * GB,
        host=4 * GB,
    )
    assert actions(acquire(view, "a")) == [Sleep("cold", 1, PRESSURE), Wake("a", ACQUIRE)]


def test_an_offloaded_model_needs_room_for_its_missing_layers_only() -> None:
    half = [Tier.DEVICE, Tier.DEVICE, Tier.HOST, Tier.HOST]
    view = node(
        model("a", 4 * GB, state=ModelState.OFFLOADED, tiers=half),
        model("b", GB),
        device=4 * GB,  # one free: two of a's layers need one more
        host=8 * GB,
    )
    assert actions(acquire(view, "a")) == [Sleep("b", 1, PRESSURE), Wake("a", ACQUIRE)]


def test_a_catalogue_entry_that_fits_is_loaded_to_the_device() -> None:
    view = node(entry("new", 2 * GB), model("old"), device=3 * GB)
    assert actions(acquire(view, "new")) == [Load("new", "/models/new", Tier.DEVICE, ACQUIRE)]


def test_a_catalogue_entry_that_needs_room_is_staged_in_host_memory_first() -> None:
    # Read from its source into host memory while "old" keeps serving; the
    # caller asks again when that is done, and then room is made.
    view = node(entry("new", 2 * GB), model("old"), device=2 * GB)
    assert actions(acquire(view, "new")) == [Load("new", "/models/new", Tier.HOST, ACQUIRE)]
    staged = node(asleep("new", 2 * GB), model("old"), device=2 * GB)
    assert actions(acquire(staged, "new")) == [Sleep("old", 1, PRESSURE), Wake("new", ACQUIRE)]


def test_a_level_2_sleeper_that_needs_room_is_read_back_to_host_first() -> None:
    view = node(asleep("a", 2 * GB, level=2), model("old"), device=2 * GB, host=4 * GB)
    assert actions(acquire(view, "a")) == [Sleep("a", 1, ACQUIRE)]
    # The host full of a colder sleeper: it is pushed down first.
    full = node(
        asleep("a", 2 * GB, level=2),
        model("old", act=used(5)),
        asleep("cold", 2 * GB, act=used(0.1)),
        device=2 * GB,
        host=2 * GB,
    )
    assert actions(acquire(full, "a")) == [Sleep("cold", 2, PRESSURE), Sleep("a", 1, ACQUIRE)]


def test_without_host_room_it_is_read_straight_to_the_device() -> None:
    view = node(asleep("a", 2 * GB, level=2), model("old"), device=2 * GB, host=0)
    assert actions(acquire(view, "a")) == [Sleep("old", 2, PRESSURE), Wake("a", ACQUIRE)]


def test_a_sleeper_needing_no_room_is_woken_straight_from_its_source() -> None:
    view = node(asleep("a", 2 * GB, level=2), device=2 * GB)
    assert actions(acquire(view, "a")) == [Wake("a", ACQUIRE)]


def test_no_room_is_a_refusal_naming_the_blockers() -> None:
    view = node(
        entry("new", 2 * GB),
        model("pinned", policy=ModelPolicy(pinned=True)),
        model("serving", act=activity(in_use=2)),
        device=2 * GB,
    )
    why = refusal(acquire(view, "new"))
    assert why.pool == "gpu0" and why.needed == 2 * GB and why.short == 2 * GB
    assert dict(why.blocked) == {"pinned": "pinned", "serving": "in use"}


def test_the_acquired_model_is_kept() -> None:
    half = [Tier.DEVICE, Tier.HOST]
    view = node(model("a", 2 * GB, state=ModelState.OFFLOADED, tiers=half), device=GB)
    why = refusal(acquire(view, "a"))
    assert dict(why.blocked) == {"a": "asked for"}


def test_a_sleeper_being_acquired_is_not_pushed_down_for_host_room() -> None:
    # The victim needs host room; the only sleeper is the model asked for.
    view = node(asleep("a", 2 * GB, act=used(0.01)), model("b", 2 * GB), device=2 * GB, host=2 * GB)
    assert actions(acquire(view, "a")) == [Sleep("b", 2, PRESSURE), Wake("a", ACQUIRE)]


def test_unknown_failed_and_sourceless_models_are_clear_errors() -> None:
    with pytest.raises(NotFound) as gone:
        acquire(node(model("a")), "zzz")
    assert gone.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(FailedPrecondition) as failed:
        acquire(node(model("a", state=ModelState.FAILED)), "a")
    assert failed.value.reason == "INVALID_STATE" and "unload it" in failed.value.message
    with pytest.raises(FailedPrecondition):
        acquire(node(model("a", state=ModelState.UNLOADED)), "a")
