"""A caller's level-1 Sleep that finds host memory full makes room as an
Offload to the host does: colder level-1 sleepers are pushed down; when
none may be, the refusal names what blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
from torpor.testing import make_checkpoint
from torpord.core.policy import PolicyOverrides
from torpord.errors import ResourceExhausted
from torpord.types import Cause, ModelState, Tier

from .pilotkit import Node, model_bytes


def host_for_one(tmp: Path) -> Node:
    """A node whose host memory holds one model's weights (and a half)."""
    size = model_bytes(tmp, make_checkpoint(tmp / "probe", layers=4, hidden=64))
    return Node(tmp, host=size * 3 // 2)


@pytest.mark.parametrize("verb", ["sleep", "offload"])
async def test_a_level_1_sleep_pushes_a_colder_sleeper_down(tmp_path: Path, verb: str) -> None:
    node = host_for_one(tmp_path)
    try:
        await node.load("a", "b")
        await node.m.sleep("a", 1)  # the host is full now
        if verb == "sleep":
            got = await node.m.sleep("b", 1)
            assert (got.state, got.sleep_level) == (ModelState.ASLEEP, 1)
        else:  # (what a Sleep now does alike)
            got = await node.m.offload("b", (), Tier.HOST)
            assert got.state is ModelState.OFFLOADED
        a = node.m.get("a")
        assert (a.state, a.sleep_level) == (ModelState.ASLEEP, 2)
        assert a.last_transition is not None and a.last_transition.cause is Cause.PRESSURE
        node.h.check_bytes("b")
    finally:
        await node.h.close()


async def test_a_level_1_sleep_that_nothing_makes_room_for_names_the_blockers(
    tmp_path: Path,
) -> None:
    node = host_for_one(tmp_path)
    try:
        await node.load("a", "b")
        await node.m.sleep("a", 1)
        node.m.set_policy("a", PolicyOverrides(pinned=True))
        with pytest.raises(ResourceExhausted) as err:
            await node.m.sleep("b", 1)
        assert err.value.reason == "OUT_OF_MEMORY"
        assert "'a'" in err.value.metadata["pinned"]
        assert {"asked", "free", "budget", "pool"} <= set(err.value.metadata)
        assert node.m.get("b").state is ModelState.ACTIVE  # nothing changed
        assert node.m.get("a").sleep_level == 1
    finally:
        await node.h.close()
