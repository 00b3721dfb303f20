"""Acquire's ready is held: a model an Acquire made ready is not evicted
for `acquire_hold` seconds (unless a use of it opens first), and making
room looks at each victim again just before evicting it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from torpor.testing import make_checkpoint
from torpord.core.activity import ActivityLog
from torpord.core.policy import PolicyOverrides
from torpord.errors import ResourceExhausted
from torpord.types import ModelState

from .pilotkit import Gated, Node, evicted
from .test_activity_log import Clock


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(tmp_path)
    # A short patience: the refused Acquire gives up well within the hold.
    n.m.settings = dataclasses.replace(n.m.settings, acquire_patience=0.2, acquire_hold=600.0)
    yield n
    await n.h.close()


async def test_concurrent_acquires_do_not_evict_a_model_handed_out_as_ready(node: Node) -> None:
    await node.load("a", "b", "c")
    for name in "abc":
        if node.m.get(name).state is ModelState.ACTIVE:
            await node.m.sleep(name, 1)
    got = await asyncio.gather(*(node.m.acquire(name) for name in "abc"), return_exceptions=True)
    ready = [name for name, g in zip("abc", got, strict=True) if not isinstance(g, BaseException)]
    refused = [g for g in got if isinstance(g, BaseException)]
    assert len(ready) == 2 and len(refused) == 1  # the device fits two
    err = refused[0]
    assert isinstance(err, ResourceExhausted) and err.reason == "OUT_OF_MEMORY"
    assert all(f"'{name}'" in err.metadata["in_use"] for name in ready)  # held
    for name in ready:  # still where the Acquire left them
        assert node.m.get(name).state is ModelState.ACTIVE
        assert node.m.activity.summary(name).in_use == 1
    assert evicted(node) == []


async def test_a_use_reported_by_a_router_or_engine_takes_the_hold_over(node: Node) -> None:
    await node.load("a")
    assert (await node.m.acquire("a")).hit
    assert node.m.activity.summary("a").in_use == 1  # the hold
    node.m.report_activity("a", "router", 0, 0.0, 1)  # the request began
    assert node.m.activity.summary("a").in_use == 1  # the router's, not both
    node.m.report_activity("a", "router", 1, 0.5, 0)  # and ended
    assert node.m.activity.summary("a").in_use == 0
    await node.m.acquire("a")
    node.m.report_activity("a", "engine", 1, 0.1, 0)  # a short use(), coalesced
    assert node.m.activity.summary("a").in_use == 0
    await node.load("b")
    node.m.set_policy("b", PolicyOverrides(pinned=True))
    await node.load("c")  # a is free to go again
    assert evicted(node) == ["a"]


async def test_with_no_hold_an_acquire_holds_nothing_once_ready(node: Node) -> None:
    node.m.settings = dataclasses.replace(node.m.settings, acquire_hold=0.0)
    await node.load("a")
    await node.m.acquire("a")
    assert node.m.activity.summary("a").in_use == 0


def test_a_hold_ends_after_its_seconds() -> None:
    clock = Clock()
    log = ActivityLog({"a"}.__contains__, clock)
    log.hold("a", 10.0)
    clock.now += 9.9
    assert log.summary("a").in_use == 1
    log.hold("a", 10.0)  # a later Acquire: held from now
    clock.now += 9.9
    assert log.summary("a").in_use == 1
    clock.now += 0.2
    assert log.summary("a").in_use == 0
    log.hold("ghost", 10.0)  # (an id the daemon doesn't know: nothing)
    assert "ghost" not in log


async def test_a_victim_acquired_while_room_is_made_is_left_alone(
    node: Node, tmp_path: Path
) -> None:
    engines = Gated(node.h)
    node.m.use_engines(engines)
    await node.load("a", "b")
    big = make_checkpoint(tmp_path / "big", layers=7, hidden=64, seed=9)  # a and b must go
    loading = asyncio.create_task(node.m.load("big", str(big)))
    await asyncio.wait_for(engines.quiescing.wait(), 10)  # the first victim's sleep
    first = next(n for n in "ab" if node.m.get(n).state is ModelState.SLEEPING)
    second = "b" if first == "a" else "a"
    assert (await node.m.acquire(second)).hit  # a request for it: held now
    engines.gate.set()
    with pytest.raises(ResourceExhausted) as err:
        await loading
    assert f"'{second}'" in err.value.metadata["in_use"]
    assert node.m.get(second).state is ModelState.ACTIVE
    assert evicted(node) == [first]
