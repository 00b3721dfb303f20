"""A policy's action that waits its turn is dropped when its model changed
meanwhile: it was decided on a view that no longer holds."""

from __future__ import annotations

import asyncio
from pathlib import Path

from torpord.core.policy import PolicyOverrides
from torpord.types import Cause, ModelState

from .pilotkit import Gated, Node


async def preload_behind_an_idle_sleep(node: Node) -> tuple[Gated, list[asyncio.Task[None]]]:
    """A round of [Sleep a (IDLE), Sleep b level 1 (PRELOAD)], the idle
    sleep held at its engines' quiesce, so the preload waits behind it."""
    m = node.m
    engines = Gated(node.h)
    m.use_engines(engines)
    await node.load("a", "b")
    engines.gate.set()
    await m.sleep("b", 2, cause=Cause.IDLE)  # a policy's level-2 sleeper...
    engines.gate.clear()
    engines.quiescing.clear()
    m.report_activity("b", "router", 50, 1.0, 0)  # ...predicted to be wanted
    m.set_policy("a", PolicyOverrides(idle_timeout=0.001))
    await asyncio.sleep(0.05)
    tasks = m.pilot.housekeep_once()
    assert sorted(t.get_name() for t in tasks) == ["Sleep a", "Sleep b"]
    await asyncio.wait_for(engines.quiescing.wait(), 10)
    return engines, tasks


async def test_a_waiting_preload_leaves_a_model_an_acquire_woke(tmp_path: Path) -> None:
    node = Node(tmp_path)
    try:
        engines, tasks = await preload_behind_an_idle_sleep(node)
        await node.m.acquire("b")  # a request for b arrives meanwhile
        engines.gate.set()
        await asyncio.wait(tasks, timeout=10)
        b = node.m.get("b")
        assert b.state is ModelState.ACTIVE  # not put back to sleep by the stale preload
        assert b.last_transition is not None and b.last_transition.cause is Cause.ACQUIRE
        node.h.check_bytes("b")
    finally:
        await node.h.close()


async def test_a_waiting_preload_leaves_a_model_a_caller_put_at_level_2(tmp_path: Path) -> None:
    """A caller's `sleep --level 2` of a model a policy had put there already
    changes no tier, but it is the caller's now: the preload decided before
    it does not warm it."""
    node = Node(tmp_path)
    try:
        engines, tasks = await preload_behind_an_idle_sleep(node)
        await node.m.sleep("b", 2)  # a caller's, of a model already at level 2
        engines.gate.set()
        await asyncio.wait(tasks, timeout=10)
        b = node.m.get("b")
        assert (b.state, b.sleep_level) == (ModelState.ASLEEP, 2)
        assert b.last_transition is not None and b.last_transition.cause is Cause.IDLE
        assert node.m.pilot.housekeep_once() == []  # nor does a later round
    finally:
        await node.h.close()
