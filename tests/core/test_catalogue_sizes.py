"""Catalogue entries' sizes (core/sizes.py) and what the pilot does with
them: RegisterModel reads the source as a Load would, a config entry whose
source is missing is kept with no size, a changed source is read again;
windows and preloads of registered models plan room with the real size;
a failing policy action is held back (core/backoff.py); a registered
model's use is shown before it is loaded."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
from torpor.testing import make_checkpoint
from torpord.core.catalogue import Entry
from torpord.core.policy import PolicyOverrides
from torpord.errors import InvalidArgument, NotFound
from torpord.policies.settings import ModelPolicy, PolicySettings, Window
from torpord.types import Cause, ModelState, Tier

from .pilotkit import Events, Node, model_bytes

ALWAYS_DEVICE = Window(start=0, end=604000, tier=Tier.DEVICE, lead=86400)  # the whole week


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(tmp_path)
    yield n
    await n.h.close()


async def test_register_reads_the_size_a_load_plans(node: Node, tmp_path: Path) -> None:
    await node.m.register("c", str(node.paths["c"]))
    entry = node.m.catalogue.get("c")
    assert entry is not None and entry.size is not None
    assert entry.size.total == node.size == model_bytes(tmp_path, node.paths["c"])
    (view,) = [v for v in node.m.pilot.view().models if v.model_id == "c"]
    assert view.sized and view.total_bytes == node.size
    assert {layer.tier for layer in view.layers} == {Tier.SOURCE}
    loaded = await node.m.load("c", "")
    assert [(s.plan.name, s.plan.size) for s in loaded.layers] == list(entry.size.layers)


async def test_register_refuses_a_source_a_load_would_refuse(node: Node, tmp_path: Path) -> None:
    with pytest.raises(NotFound) as missing:
        await node.m.register("x", str(tmp_path / "nothing-here"))
    assert missing.value.reason == "SOURCE_NOT_FOUND"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}  ")
    with pytest.raises(InvalidArgument) as invalid:
        await node.m.register("x", str(bad))
    assert invalid.value.reason == "INVALID_CHECKPOINT"
    assert node.m.catalogue.get("x") is None


async def test_a_config_entry_without_its_source_is_kept_until_the_source_appears(
    tmp_path: Path,
) -> None:
    later = tmp_path / "later"
    entry = Entry("later", str(later), "", ModelPolicy(windows=(ALWAYS_DEVICE,)))
    node = Node(tmp_path, PolicySettings(), catalogue=(entry,))
    try:
        await node.m.sizes.refresh()
        got = node.m.catalogue.get("later")
        assert got is not None and got.size is None  # kept, size unknown
        (view,) = [v for v in node.m.pilot.view().models if v.model_id == "later"]
        assert not view.sized and view.layers == ()
        # Its DEVICE window is open, but no room can be planned: nothing runs.
        assert node.m.pilot.housekeep_once() == []
        make_checkpoint(later, layers=4, hidden=64)
        await node.m.sizes.refresh()  # (it looks different now: read at once)
        got = node.m.catalogue.get("later")
        assert got is not None and got.size is not None and got.size.total == node.size
        started = node.m.pilot.housekeep_once()
        await asyncio.wait(started)
        assert node.m.get("later").state is ModelState.ACTIVE
    finally:
        await node.h.close()


async def test_a_source_registered_again_starts_its_failures_afresh(tmp_path: Path) -> None:
    """A config entry whose source failed, then registered by a caller (read
    fine): when its source later fails again, that is a new failure, said
    at once, not the old one's back-off carried on in silence."""
    later = tmp_path / "later"
    entry = Entry("later", str(later), "", ModelPolicy())
    node = Node(tmp_path, PolicySettings(), catalogue=(entry,))
    try:
        with structlog.testing.capture_logs() as logs:
            await node.m.sizes.refresh()  # SOURCE_NOT_FOUND: said once
            make_checkpoint(later, layers=4, hidden=64)
            await node.m.register("later", str(later))
            await node.m.sizes.refresh()  # (read fine, nothing to say)
            shutil.rmtree(later)
            await node.m.sizes.refresh()  # SOURCE_NOT_FOUND again: said again
        said = [e.get("reason") for e in logs if e["log_level"] == "warning"]
        assert said == ["SOURCE_NOT_FOUND", "SOURCE_NOT_FOUND"], logs
        assert not [e for e in logs if "can be read again" in e["event"]]
    finally:
        await node.h.close()


async def test_a_changed_source_is_read_again(node: Node, tmp_path: Path) -> None:
    source = tmp_path / "grows"
    make_checkpoint(source, layers=2, hidden=64)
    await node.m.register("grows", str(source))
    entry = node.m.catalogue.get("grows")
    assert entry is not None and entry.size is not None
    small = entry.size.total
    await node.m.sizes.refresh()  # unchanged: the same size
    assert node.m.catalogue.get("grows") == entry
    make_checkpoint(source, layers=6, hidden=64, seed=3)
    await node.m.sizes.refresh()
    entry = node.m.catalogue.get("grows")
    assert entry is not None and entry.size is not None
    assert entry.size.total > small
    assert entry.size.total == model_bytes(tmp_path, source)


async def test_a_device_window_of_a_registered_model_makes_room_for_it(node: Node) -> None:
    await node.load("a", "b")  # the device has room for half a model more
    await node.m.register(
        "c", str(node.paths["c"]), policy=PolicyOverrides(windows=(ALWAYS_DEVICE,))
    )
    started = node.m.pilot.housekeep_once()
    await asyncio.wait(started)
    c = node.m.get("c")
    assert c.state is ModelState.ACTIVE
    assert c.last_transition is not None and c.last_transition.cause is Cause.SCHEDULE
    states = {node.m.get(m).state for m in "ab"}
    assert states == {ModelState.ACTIVE, ModelState.ASLEEP}  # one made room for it
    node.h.check_bytes("c")


async def test_a_predicted_preload_stays_within_the_host_and_the_sleeper_limit(
    tmp_path: Path,
) -> None:
    node = Node(tmp_path, PolicySettings(max_sleeping_models=1), host=64 * 2**20)
    try:
        for name in "cd":
            await node.m.register(name, str(node.paths[name]))
            node.m.report_activity(name, "router", 50, 1.0, 0)  # wanted often
        started = node.m.pilot.housekeep_once()
        await asyncio.wait(started)
        # One level-1 sleeper at most: the likelier (here a tie: by id) is preloaded.
        states = {m: node.m.get(m).state for m in "cd"}
        assert states == {"c": ModelState.ASLEEP, "d": ModelState.UNLOADED}
        assert node.m.pilot.housekeep_once() == []  # the limit holds
    finally:
        await node.h.close()


async def test_a_predicted_preload_leaves_a_callers_level_2_sleep_alone(node: Node) -> None:
    await node.load("a")
    await node.m.sleep("a", 2)  # a caller freed the host memory on purpose
    node.m.report_activity("a", "router", 50, 1.0, 0)
    assert node.m.pilot.housekeep_once() == []
    assert (node.m.get("a").state, node.m.get("a").sleep_level) == (ModelState.ASLEEP, 2)


async def test_a_predicted_preload_warms_a_level_2_sleeper_to_the_host(node: Node) -> None:
    await node.load("a")
    await node.m.sleep("a", 2, cause=Cause.IDLE)  # a policy's, not a caller's
    node.m.report_activity("a", "router", 50, 1.0, 0)
    started = node.m.pilot.housekeep_once()
    assert len(started) == 1
    await asyncio.wait(started)
    a = node.m.get("a")
    assert (a.state, a.sleep_level) == (ModelState.ASLEEP, 1)  # warm, not woken
    assert {layer.tier for layer in a.layers} == {Tier.HOST}
    assert a.last_transition is not None and a.last_transition.cause is Cause.PRELOAD
    node.h.check_bytes("a")


async def test_an_acquire_stages_a_registered_model_through_the_host(node: Node) -> None:
    await node.load("a", "b")  # the device is full: room must be made for c
    await node.m.register("c", str(node.paths["c"]))
    events = Events(node.m)
    got = await node.m.acquire("c")
    await events.close()
    assert got.snapshot.state is ModelState.ACTIVE
    node.h.check_bytes("c")
    # c was read into host memory (a Load to HOST) while a and b held the
    # device; only then was room made and c woken from there.
    firsts = events.moves(ModelState.LOADING, ModelState.SLEEPING, ModelState.WAKING)
    assert firsts[0] == ("c", ModelState.LOADING, Cause.ACQUIRE)
    assert firsts[-1] == ("c", ModelState.WAKING, Cause.ACQUIRE)
    assert [m for m, _, cause in firsts[1:-1] if cause is Cause.PRESSURE] in (["a"], ["b"])


async def test_a_failing_policy_action_is_held_back(tmp_path: Path) -> None:
    # The window's Load fails (the source goes bad after its size was read):
    # the next rounds leave the model alone rather than failing every round.
    source = tmp_path / "flaky"
    make_checkpoint(source, layers=4, hidden=64)
    node = Node(tmp_path, PolicySettings())
    try:
        policy = PolicyOverrides(windows=(ALWAYS_DEVICE,))
        await node.m.register("flaky", str(source), policy=policy)
        (source / "model.safetensors").write_bytes(b"\x00" * 64)
        started = node.m.pilot.housekeep_once()
        assert len(started) == 1
        await asyncio.wait(started)
        assert node.m.get("flaky").state is ModelState.UNLOADED
        assert "flaky" in node.m.pilot.backoff.held(asyncio.get_running_loop().time())
        assert node.m.pilot.housekeep_once() == []
    finally:
        await node.h.close()


async def test_a_registered_models_use_is_shown_before_it_is_loaded(node: Node) -> None:
    await node.m.register("c", str(node.paths["c"]))
    node.m.report_activity("c", "router", 100, 2.0, 0)
    got = node.m.get("c")
    assert got.state is ModelState.UNLOADED and got.activity.uses == 100
    assert got.activity.last_use > 0
    (listed,) = [m for m in node.m.list_models(registered=True) if m.model_id == "c"]
    assert listed.activity.uses == 100


async def test_a_re_pointed_symlink_is_read_again(node: Node, tmp_path: Path) -> None:
    small = make_checkpoint(tmp_path / "v1", layers=2, hidden=64)
    large = make_checkpoint(tmp_path / "v2", layers=6, hidden=64, seed=3)
    current = tmp_path / "current"
    current.symlink_to(small)
    await node.m.register("cur", str(current))
    await node.m.sizes.refresh()
    entry = node.m.catalogue.get("cur")
    assert entry is not None and entry.size is not None
    assert entry.size.total == model_bytes(tmp_path, small)
    tmp = tmp_path / "current.new"  # the deploy: a new link renamed over the old
    tmp.symlink_to(large)
    tmp.rename(current)
    await node.m.sizes.refresh()
    entry = node.m.catalogue.get("cur")
    assert entry is not None and entry.size is not None
    assert entry.size.total == model_bytes(tmp_path, large)
