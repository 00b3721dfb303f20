"""The pilot: eviction under memory pressure and the housekeeping loop, on
the host backend with one device that fits two models."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from torpord.core.policy import PolicyOverrides
from torpord.errors import ResourceExhausted, Unavailable
from torpord.policies.settings import ModelPolicy, PolicySettings, Window
from torpord.types import Cause, ModelState, Tier

from .harness import Harness
from .pilotkit import Events, Gated, Node, evicted
from .test_engines import Recorder


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(tmp_path)
    yield n
    await n.h.close()


async def test_a_load_that_does_not_fit_evicts_the_coldest(node: Node) -> None:
    await node.load("a", "b")
    await node.m.acquire("a")  # (a use: b is colder)
    m = await node.m.load("c", str(node.paths["c"]), request_id="load-c")
    assert m.state is ModelState.ACTIVE
    assert evicted(node) == ["b"]
    b = node.m.get("b")
    assert (b.state, b.sleep_level) == (ModelState.ASLEEP, 1)  # evict_to HOST
    assert node.device_used() <= node.capacity()
    for name in "abc":
        node.h.check_bytes(name)
    # A retry of the same Load gets the first call's outcome: no stale refusal.
    again = await node.m.load("c", str(node.paths["c"]), request_id="load-c")
    assert again.state is ModelState.ACTIVE and evicted(node) == ["b"]


async def test_a_wake_that_does_not_fit_evicts(node: Node) -> None:
    await node.load("a", "b")
    await node.m.sleep("a", 2)
    await node.load("c")
    m = await node.m.wake("a")
    assert m.state is ModelState.ACTIVE and len(evicted(node)) == 1
    assert node.device_used() <= node.capacity()
    node.h.check_bytes("a")


async def test_an_offload_to_the_device_that_does_not_fit_evicts(node: Node) -> None:
    await node.load("a", "b")
    await node.m.offload("a", (), Tier.HOST)
    await node.load("c")
    m = await node.m.offload("a", (), Tier.DEVICE)
    assert m.state is ModelState.ACTIVE and len(evicted(node)) == 1


async def test_an_acquire_that_does_not_fit_evicts(node: Node) -> None:
    await node.load("a", "b", "c")  # (c evicted one already)
    asleep = [s.model_id for s in node.m.list_models() if s.state is ModelState.ASLEEP]
    assert len(asleep) == 1
    got = await node.m.acquire(asleep[0])
    assert got.snapshot.state is ModelState.ACTIVE and not got.hit
    record = got.snapshot.last_transition
    assert record is not None and record.cause is Cause.ACQUIRE
    assert len(evicted(node)) == 1 and asleep[0] not in evicted(node)  # another one went
    assert node.device_used() <= node.capacity()


async def test_pinned_models_are_named_when_nothing_can_go(tmp_path: Path) -> None:
    node = Node(tmp_path, PolicySettings(default=ModelPolicy(pinned=True)))
    try:
        await node.load("a", "b")
        with pytest.raises(ResourceExhausted) as err:
            await node.load("c")
        assert err.value.reason == "OUT_OF_MEMORY"
        assert "'a'" in err.value.metadata["pinned"] and "'b'" in err.value.metadata["pinned"]
        assert {"asked", "free", "budget", "pool"} <= set(err.value.metadata)
        assert "pinned" in err.value.message
        assert [s.model_id for s in node.m.list_models()] == ["a", "b"]  # nothing changed
        assert evicted(node) == []
    finally:
        await node.h.close()


async def test_models_in_transition_are_named(node: Node) -> None:
    engines = Gated(node.h)
    node.m.use_engines(engines)
    await node.load("a", "b")
    await node.m.sleep("a", 1, wait=False)
    await node.m.sleep("b", 1, wait=False)
    await asyncio.wait_for(engines.quiescing.wait(), 10)
    with pytest.raises(ResourceExhausted) as err:
        await node.load("c")
    assert "'a'" in err.value.metadata["in_transition"]
    assert "'b'" in err.value.metadata["in_transition"]
    engines.gate.set()


async def test_with_the_policy_layer_off_a_full_device_refuses(tmp_path: Path) -> None:
    node = Node(tmp_path, PolicySettings(enabled=False))
    try:
        await node.load("a", "b")
        with pytest.raises(ResourceExhausted) as err:
            await node.load("c")
        assert err.value.reason == "OUT_OF_MEMORY" and "pinned" not in err.value.metadata
        assert {s.state for s in node.m.list_models()} == {ModelState.ACTIVE}
        node.m.pilot.housekeep_once()  # (off: nothing)
    finally:
        await node.h.close()


IDLE = PolicySettings(default=ModelPolicy(idle_timeout=0.05), preload=False)


async def test_idle_models_go_to_sleep(tmp_path: Path) -> None:
    node = Node(tmp_path, IDLE)
    try:
        await node.load("a")
        node.m.pilot.start()
        for _ in range(1000):
            if node.m.get("a").state is ModelState.ASLEEP:
                break
            await asyncio.sleep(0.01)
        a = node.m.get("a")
        assert a.state is ModelState.ASLEEP and a.last_transition is not None
        assert a.last_transition.cause is Cause.IDLE and a.sleep_level == 1
        node.h.check_bytes("a")
    finally:
        await node.m.pilot.stop()
        await node.h.close()


class Refusing(Recorder):
    """Engines that fail the first `failures` requests to let go."""

    def __init__(self, h: Harness, failures: int) -> None:
        super().__init__(h)
        self.failures = failures

    async def quiesce(self, model_id: str, layers: Sequence[str]) -> list[str]:
        if self.failures > 0:
            self.failures -= 1
            raise Unavailable("the engine could not let go", reason="TEST_REFUSED")
        return await super().quiesce(model_id, layers)


async def test_a_failed_action_leaves_the_loop_running(tmp_path: Path) -> None:
    # The idle sleep fails twice (rolled back, logged); later rounds try again.
    node = Node(tmp_path, IDLE)
    engines = Refusing(node.h, failures=2)
    node.m.use_engines(engines)
    events = Events(node.m)
    try:
        await node.load("a")
        node.m.pilot.start()
        for _ in range(1000):
            if node.m.get("a").state is ModelState.ASLEEP:
                break
            await asyncio.sleep(0.01)
        assert node.m.pilot.running and engines.failures == 0
        a = node.m.get("a")
        assert a.state is ModelState.ASLEEP and a.last_transition is not None
        assert a.last_transition.cause is Cause.IDLE
        assert events.started(ModelState.SLEEPING) == [Cause.IDLE] * 3
        node.h.check_bytes("a")
    finally:
        await events.close()
        await node.m.pilot.stop()
        assert not node.m.pilot.running
        await node.h.close()


async def test_an_acquire_waits_for_models_in_use_a_load_does_not(node: Node) -> None:
    await node.load("a", "b")
    await node.m.sleep("a", 2)
    await node.load("c")
    for name in "bc":  # a router has a request running on each
        node.m.report_activity(name, "router", 0, 0.0, 1)
    with pytest.raises(ResourceExhausted) as err:  # a caller's Wake: refused at once
        await node.m.wake("a")
    assert "'b'" in err.value.metadata["in_use"] and "'c'" in err.value.metadata["in_use"]
    waiting = asyncio.create_task(node.m.acquire("a"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()  # b and c are in use: the Acquire waits ...
    node.m.report_activity("c", "router", 1, 0.1, 0)  # ... until the router is done with c
    got = await waiting
    assert got.snapshot.state is ModelState.ACTIVE and evicted(node) == ["c"]


async def test_an_acquire_without_patience_is_refused_at_once(node: Node) -> None:
    node.m.settings = dataclasses.replace(node.m.settings, acquire_patience=0.0)
    await node.load("a", "b")
    await node.m.sleep("a", 2)
    await node.load("c")
    for name in "bc":
        node.m.report_activity(name, "router", 0, 0.0, 1)
    refused = asyncio.create_task(node.m.acquire("a"))  # [policy] acquire_patience = "0s"
    for _ in range(200):
        if refused.done():
            break
        await asyncio.sleep(0)
    node.m.report_activity("c", "router", 1, 0.1, 0)  # (a patient one would take c now)
    with pytest.raises(ResourceExhausted) as err:
        await refused
    assert "'b'" in err.value.metadata["in_use"] and "'c'" in err.value.metadata["in_use"]
    assert node.m.get("a").state is ModelState.ASLEEP


async def test_an_acquire_stages_a_level_2_sleeper_in_host_memory_before_evicting(
    node: Node,
) -> None:
    await node.load("c")
    await node.m.sleep("c", 2)
    await node.load("a", "b")  # the device is full: room must be made for c
    events = Events(node.m)
    got = await node.m.acquire("c")
    await events.close()
    assert got.snapshot.state is ModelState.ACTIVE
    node.h.check_bytes("c")
    # c's weights were read into host memory (a level-1 sleep of it) while a
    # and b still held the device, and only then was room made and c woken.
    firsts = events.moves(ModelState.SLEEPING, ModelState.WAKING)
    assert firsts[0] == ("c", ModelState.SLEEPING, Cause.ACQUIRE)
    assert firsts[-1] == ("c", ModelState.WAKING, Cause.ACQUIRE)
    assert [m for m, state, cause in firsts[1:-1]] in (["a"], ["b"])
    assert all(cause is Cause.PRESSURE for _, _, cause in firsts[1:-1])


async def test_a_host_window_brings_a_level_2_sleepers_weights_to_the_host(node: Node) -> None:
    await node.load("a")
    await node.m.sleep("a", 2)
    assert node.h.backend.host_pool().used == 0
    always = Window(start=0, end=604000, tier=Tier.HOST, lead=86400)  # warm the whole week
    node.m.set_policy("a", PolicyOverrides(windows=(always,)))
    started = node.m.pilot.housekeep_once()
    assert len(started) == 1
    await asyncio.wait(started)
    a = node.m.get("a")
    assert (a.state, a.sleep_level) == (ModelState.ASLEEP, 1)
    assert {layer.tier for layer in a.layers} == {Tier.HOST}
    assert a.last_transition is not None and a.last_transition.cause is Cause.SCHEDULE
    node.h.check_bytes("a")
    assert node.m.pilot.housekeep_once() == []  # warm now: nothing more to do
