"""A caller's Load of a model a policy is loading from the same source joins
that Load and goes on to the tier it asked; another source is refused; a
Load of a loaded model sets the policy fields it gives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from torpor.testing import make_checkpoint
from torpord.core.policy import PolicyOverrides
from torpord.errors import AlreadyExists
from torpord.storage.sources import resolve_source
from torpord.types import Cause, ModelState, Tier

from .harness import Harness
from .pilotkit import Events


@pytest.fixture
async def events(h: Harness) -> AsyncIterator[Events]:
    e = Events(h.manager)
    yield e
    await e.close()


async def preloading(h: Harness, ckpt: Path, stage: str) -> asyncio.Task[object] | None:
    """A policy's Load of "m" to host memory (PRELOAD), caught at `stage`:
    still validating its checkpoint (its task, running), or copying."""
    m = h.manager
    if stage == "loading":
        await m.load("m", str(ckpt), target=Tier.HOST, wait=False, cause=Cause.PRELOAD)
        assert m.get("m").state is ModelState.LOADING
        return None
    task: asyncio.Task[object] = asyncio.create_task(
        m.load("m", str(ckpt), target=Tier.HOST, cause=Cause.PRELOAD)
    )
    while "m" not in m.registry.validating:
        await asyncio.sleep(0)
    return task


@pytest.mark.parametrize("stage", ["validating", "loading"])
async def test_a_users_load_joins_a_policys_preload_and_goes_on_to_the_device(
    h: Harness, ckpt: Path, events: Events, stage: str
) -> None:
    policy = await preloading(h, ckpt, stage)
    got = await h.manager.load("m", str(ckpt), policy=PolicyOverrides(priority=7))
    assert got.state is ModelState.ACTIVE and got.policy.priority == 7
    assert {layer.tier for layer in got.layers} == {Tier.DEVICE}
    assert events.started(ModelState.LOADING) == [Cause.PRELOAD]  # one Load, the policy's
    assert events.started(ModelState.WAKING) == [Cause.USER]  # then on to the device
    if policy is not None:
        await policy  # (it succeeded: to host memory, as it meant to)
    h.check_bytes("m")


async def test_a_users_load_to_the_host_joins_and_stays_there(
    h: Harness, ckpt: Path, events: Events
) -> None:
    await preloading(h, ckpt, "validating")
    got = await h.manager.load("m", str(ckpt), target=Tier.HOST)
    assert (got.state, got.sleep_level) == (ModelState.ASLEEP, 1)
    assert events.started(ModelState.LOADING) == [Cause.PRELOAD]
    assert events.started(ModelState.WAKING) == []


async def test_a_joined_load_without_wait_wakes_behind(h: Harness, ckpt: Path) -> None:
    await preloading(h, ckpt, "loading")
    got = await h.manager.load("m", str(ckpt), wait=False)
    assert got.state is ModelState.LOADING  # (the policy's Load, running)
    for _ in range(1000):
        if h.manager.get("m").state is ModelState.ACTIVE:
            break
        await asyncio.sleep(0.01)
    assert h.manager.get("m").state is ModelState.ACTIVE
    h.check_bytes("m")


@pytest.mark.parametrize("stage", ["validating", "loading"])
async def test_a_load_from_another_source_is_refused_naming_the_policys(
    h: Harness, ckpt: Path, tmp_path: Path, stage: str
) -> None:
    other = make_checkpoint(tmp_path / "other", layers=2, hidden=64)
    policy = await preloading(h, ckpt, stage)
    with pytest.raises(AlreadyExists) as err:
        await h.manager.load("m", str(other))
    assert err.value.reason == "MODEL_EXISTS"
    assert err.value.metadata["source"] == resolve_source(str(ckpt), (tmp_path.resolve(),))
    if policy is not None:
        await policy
    task = h.manager.registry.models["m"].task
    assert task is not None
    assert (await task).state is ModelState.ASLEEP  # the policy's Load went on


async def test_a_load_of_a_loaded_model_sets_the_policy_it_gives(h: Harness, ckpt: Path) -> None:
    await h.manager.load("m", str(ckpt))
    await h.manager.register("m", str(ckpt))
    entry = h.manager.catalogue.get("m")
    assert entry is not None
    again = await h.manager.load(
        "m", str(ckpt), policy=PolicyOverrides(idle_timeout=120.0, priority=7)
    )
    assert (again.policy.idle_timeout, again.policy.priority) == (120.0, 7)
    assert h.manager.get("m").policy == again.policy
    assert h.manager.catalogue.get("m") == entry  # (as a first Load: the entry keeps its own)
    same = await h.manager.load("m", str(ckpt))  # no fields: nothing changes
    assert same.policy == again.policy
