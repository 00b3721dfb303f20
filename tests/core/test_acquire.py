"""Acquire: ready at once when ACTIVE, else made ready; concurrent calls
share one transition; a caller's call wins over a policy's transition."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from torpor.testing import make_checkpoint
from torpord.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from torpord.policies.settings import PolicySettings
from torpord.types import Cause, ModelState, Outcome, Tier, TransitionKind

from .harness import Harness
from .pilotkit import Events, Gated


@pytest.fixture
async def events(h: Harness) -> AsyncIterator[Events]:
    e = Events(h.manager)
    yield e
    await e.close()


async def test_an_active_model_is_a_hit(h: Harness, ckpt: Path) -> None:
    await h.manager.load("m", str(ckpt))
    got = await h.manager.acquire("m")
    assert got.hit and got.snapshot.state is ModelState.ACTIVE and got.seconds >= 0
    assert h.manager.get("m").last_transition.kind is TransitionKind.LOAD  # nothing moved


@pytest.mark.parametrize("level", [1, 2])
async def test_a_sleeping_model_wakes(h: Harness, ckpt: Path, level: int) -> None:
    await h.manager.load("m", str(ckpt))
    await h.manager.sleep("m", level)
    got = await h.manager.acquire("m", request_id="r1")
    assert not got.hit and got.snapshot.state is ModelState.ACTIVE
    record = got.snapshot.last_transition
    assert record is not None and (record.kind, record.cause) == (
        TransitionKind.WAKE,
        Cause.ACQUIRE,
    )
    h.check_bytes("m")
    assert (await h.manager.acquire("m", request_id="r1")).hit  # (no replay: it is just ready)


async def test_an_offloaded_model_comes_back_whole(h: Harness, ckpt: Path) -> None:
    await h.manager.load("m", str(ckpt))
    await h.manager.offload("m", ["pre", "layers.3"], Tier.HOST)
    got = await h.manager.acquire("m")
    assert not got.hit and {layer.tier for layer in got.snapshot.layers} == {Tier.DEVICE}
    h.check_bytes("m")


async def test_concurrent_acquires_share_one_wake(h: Harness, ckpt: Path, events: Events) -> None:
    await h.manager.load("m", str(ckpt))
    await h.manager.sleep("m", 2)
    got = await asyncio.gather(*(h.manager.acquire("m") for _ in range(8)))
    assert all(g.snapshot.state is ModelState.ACTIVE and not g.hit for g in got)
    assert events.started(ModelState.WAKING) == [Cause.ACQUIRE]  # one wake, not eight
    assert len(h.manager.acquisitions) == 8


async def test_an_acquire_joins_a_callers_wake(h: Harness, ckpt: Path, events: Events) -> None:
    await h.manager.load("m", str(ckpt))
    await h.manager.sleep("m", 2)
    await h.manager.wake("m", wait=False)  # a caller's, running
    got = await h.manager.acquire("m")
    assert got.snapshot.state is ModelState.ACTIVE and not got.hit
    assert events.started(ModelState.WAKING) == [Cause.USER]


async def test_unknown_and_failed_models(h: Harness, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        await h.manager.acquire("nobody")
    with pytest.raises(InvalidArgument):
        await h.manager.acquire("../x")
    with pytest.raises(InvalidArgument, match="request_id"):
        await h.manager.acquire("nobody", request_id="r" * 200)
    path = tmp_path / "one.safetensors"
    make_checkpoint(path, layers=2)
    await h.manager.load("m", str(path))
    await h.manager.sleep("m", 2)
    with open(path, "ab") as f:  # the source changes: the wake fails
        f.write(b"\0" * 16)
    with pytest.raises(FailedPrecondition, match="changed"):
        await h.manager.acquire("m")
    assert h.manager.get("m").state is ModelState.ASLEEP  # (a named state)
    h.manager.registry.models["m"].set_state(ModelState.FAILED, "TEST", "made to fail")
    with pytest.raises(FailedPrecondition, match="FAILED") as err:
        await h.manager.acquire("m")
    assert err.value.metadata["state"] == "FAILED"


@pytest.mark.parametrize("caller", ["wake", "acquire", "sleep2", "offload"])
async def test_a_callers_call_preempts_a_policys_sleep(h: Harness, ckpt: Path, caller: str) -> None:
    engines = Gated(h)
    h.manager.use_engines(engines)
    await h.manager.load("m", str(ckpt))
    await h.manager.sleep("m", 1, wait=False, cause=Cause.IDLE)
    policy = h.manager.registry.models["m"].task
    assert policy is not None
    await asyncio.wait_for(engines.quiescing.wait(), 10)
    engines.gate.set()  # (the caller's own transition may quiesce too)
    if caller == "wake":
        m = await h.manager.wake("m")
    elif caller == "acquire":
        m = (await h.manager.acquire("m")).snapshot
    elif caller == "sleep2":
        m = await h.manager.sleep("m", 2)
    else:
        m = await h.manager.offload("m", ["pre"], Tier.HOST)
    with pytest.raises(Aborted) as err:
        await policy
    assert err.value.reason == "PREEMPTED" and err.value.metadata["cause"] == "IDLE"
    expected = {"wake": ModelState.ACTIVE, "acquire": ModelState.ACTIVE}
    assert m.state is expected.get(caller, m.state)
    if caller == "sleep2":
        assert (m.state, m.sleep_level) == (ModelState.ASLEEP, 2)
    if caller == "offload":
        assert m.state is ModelState.OFFLOADED
    h.check_bytes("m")


async def test_a_policys_sleep_does_not_preempt_anything(h: Harness, ckpt: Path) -> None:
    engines = Gated(h)
    h.manager.use_engines(engines)
    await h.manager.load("m", str(ckpt))
    await h.manager.sleep("m", 1, wait=False)  # a caller's
    await asyncio.wait_for(engines.quiescing.wait(), 10)
    with pytest.raises(Aborted) as err:
        await h.manager.sleep("m", 2, cause=Cause.IDLE)
    assert err.value.reason == "TRANSITION_IN_PROGRESS"
    engines.gate.set()
    task = h.manager.registry.models["m"].task
    assert task is not None
    m = await task
    assert (m.state, m.last_transition.outcome) == (ModelState.ASLEEP, Outcome.SUCCEEDED)


async def test_acquire_with_the_policy_layer_off(tmp_path: Path, ckpt: Path) -> None:
    h = Harness(tmp_path, policy=PolicySettings(enabled=False))
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.sleep("m", 1)
        got = await h.manager.acquire("m")
        assert got.snapshot.state is ModelState.ACTIVE and not got.hit
    finally:
        await h.close()
