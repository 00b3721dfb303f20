"""The baselines behave like the systems they stand for, on this code."""

from __future__ import annotations

from dataclasses import replace

from torpord.policies.actions import Sleep
from torpord.policies.baselines import keep_alive, lru_sleep
from torpord.policies.decide import housekeeping, make_room
from torpord.policies.view import NodeView
from torpord.types import Cause

from tests.policies.build import GB, GPU, NOW, actions, activity, entry, model, node, used


def with_defaults(view: NodeView) -> NodeView:
    """Each model takes the settings' default policy (as the daemon resolves it)."""
    policy = view.settings.default
    return replace(view, models=tuple(replace(m, policy=policy) for m in view.models))


def test_keep_alive_unloads_after_five_idle_minutes() -> None:
    def at(idle: float) -> list[object]:
        view = node(model("a", act=activity(last_use=NOW - idle)), settings=keep_alive())
        return list(housekeeping(with_defaults(view)))

    assert at(300) == [Sleep("a", 2, Cause.IDLE)]
    assert at(299) == []


def test_keep_alive_unloads_the_least_recently_used_to_make_room() -> None:
    view = node(
        model("old", act=activity(last_use=NOW - 100, uses=1000)),
        model("new", act=activity(last_use=NOW - 10)),
        settings=keep_alive(),
    )
    assert actions(make_room(with_defaults(view), GPU, GB)) == [Sleep("old", 2, Cause.PRESSURE)]


def test_lru_sleep_puts_the_least_recently_used_to_sleep_and_never_idles() -> None:
    view = node(
        model("old", act=activity(last_use=NOW - 100_000)),
        model("new", act=activity(last_use=NOW - 10)),
        settings=lru_sleep(),
    )
    view = with_defaults(view)
    assert actions(make_room(view, GPU, GB)) == [Sleep("old", 1, Cause.PRESSURE)]
    assert list(housekeeping(view)) == []


def test_baselines_do_not_preload() -> None:
    for settings in (keep_alive(), lru_sleep()):
        view = with_defaults(node(entry("e", act=used(100)), settings=settings))
        assert list(housekeeping(view)) == []
