"""A forced Unload racing every point of every transition: nothing is ever stuck.

Randomized but seeded and bounded: each try starts a transition without
waiting, lets the event loop run a random number of steps (none included:
the transition's task has then not taken its first step) or a few
milliseconds, and unloads by force. Whatever point that lands on, the model
must be gone, and once every try is done every pool is empty and the
process holds the fds it held before.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from torpor.testing import make_checkpoint, write_safetensors
from torpord.errors import Aborted, NotFound, TorporError
from torpord.types import ModelState, Tier

from .harness import Harness, disk_harness

TRIES = 300


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settled_fds(expected: int) -> int:
    """The fd count once it is back to `expected`, or after 10 s: a Load's
    validation stopped by a forced Unload is not waited for, and its worker
    may still hold a file open for a moment."""
    for _ in range(1000):
        if fds() == expected:
            break
        await asyncio.sleep(0.01)
    return fds()


async def pause(rng: random.Random) -> None:
    """A random point: 0-6 event loop steps, or 0-5 ms."""
    if rng.random() < 0.7:
        for _ in range(rng.randint(0, 6)):
            await asyncio.sleep(0)
    else:
        await asyncio.sleep(rng.random() * 0.005)


async def test_forced_unload_at_any_point_rolls_back_and_frees(tmp_path: Path) -> None:
    h = disk_harness(tmp_path)
    m = h.manager
    ckpt = str(make_checkpoint(tmp_path / "m", layers=6, hidden=64, shards=2))
    rng = random.Random(20261202)
    before = fds()
    outcomes: dict[str, int] = {}

    async def awake() -> None:
        if "m" not in m.registry.models:
            await m.load("m", ckpt)
        elif m.registry.models["m"].state is not ModelState.ACTIVE:
            await m.wake("m")

    async def asleep(level: int) -> None:
        await awake()
        await m.sleep("m", level)

    verbs: dict[str, Callable[[], Awaitable[object]]] = {
        "load": lambda: m.load("m", ckpt, wait=False),
        "load-host": lambda: m.load("m", ckpt, target=Tier.HOST, wait=False),
        "sleep1": lambda: m.sleep("m", 1, wait=False),
        "sleep2": lambda: m.sleep("m", 2, wait=False),
        "sleep2-disk": lambda: m.sleep("m", 2, disk_copy=True, wait=False),
        "wake": lambda: m.wake("m", wait=False, verify=True),
        "offload-host": lambda: m.offload("m", ["pre", "layers.2"], Tier.HOST, wait=False),
        "offload-disk": lambda: m.offload("m", ["layers.1"], Tier.DISK, wait=False),
        "unload": lambda: m.unload("m", wait=False),
    }
    setup: dict[str, Callable[[], Awaitable[None]]] = {
        "load": lambda: asyncio.sleep(0),
        "load-host": lambda: asyncio.sleep(0),
        "wake": lambda: asleep(rng.choice((1, 2))),
    }
    for _ in range(TRIES):
        verb = rng.choice(sorted(verbs))
        await setup.get(verb, awake)()
        await verbs[verb]()
        await pause(rng)
        try:
            await m.unload("m", force=True)
            outcome = "unloaded"
        except NotFound:
            outcome = "gone already"  # (its own Unload finished first)
        assert "m" not in m.registry.models, (verb, m.registry.models["m"].state)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert h.device_used() == 0 and h.backend.host_pool().used == 0
    assert await settled_fds(before) == before
    assert outcomes.get("unloaded", 0) > TRIES // 2


async def test_forced_unload_racing_a_load_from_its_very_start(tmp_path: Path) -> None:
    """Load and forced Unload sent together, the Unload after 0-6 loop steps or
    a few ms: the Load either finished (and the Unload removed it) or was
    cancelled with the Unload named as the cause, wherever it was, the
    checkpoint's validation included; never stuck, nothing kept."""
    h = Harness(tmp_path)
    m = h.manager
    ckpt = str(make_checkpoint(tmp_path / "m", layers=6, hidden=64, shards=2))
    rng = random.Random(7)
    before = fds()
    causes: set[str] = set()
    for _ in range(TRIES // 2):
        load = asyncio.create_task(m.load("m", ckpt, wait=rng.random() < 0.5))
        await pause(rng)
        first = False
        try:
            await m.unload("m", force=True)
        except NotFound as err:
            first = "validating" not in err.message  # it came before the Load began
        try:
            await load
        except Aborted as err:
            assert err.reason == "CANCELLED" and "forced unload" in err.message
            causes.add(err.message.split(" of model")[0])
        except TorporError as err:  # pragma: no cover (a failure to show)
            pytest.fail(f"load ended with {err!r}")
        assert "m" not in m.registry.validating
        if first:  # the Load ran after it, undisturbed (perhaps still running)
            await m.unload("m", force=True)
        assert "m" not in m.registry.models
    assert h.device_used() == 0 and h.backend.host_pool().used == 0
    assert await settled_fds(before) == before
    assert causes == {"cancelled by a forced unload"}
    assert (await m.load("m", ckpt)).state is ModelState.ACTIVE  # the id is free again


def many_tensors(path: Path, count: int = 60_000) -> str:
    """A checkpoint whose validation takes a while (many small tensors)."""
    tensors = {f"model.layers.{i % 4}.t{i}": ("U8", [1], b"\0") for i in range(count)}
    return str(write_safetensors(path, tensors))


async def test_a_retry_without_waiting_during_validation_gets_the_model(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    m = h.manager
    ckpt = many_tensors(tmp_path / "big.safetensors")
    first = asyncio.create_task(m.load("m", ckpt, request_id="r1"))
    while "m" not in m.registry.validating:
        await asyncio.sleep(0)
    retry = await m.load("m", ckpt, request_id="r1", wait=False)  # (not NOT_FOUND)
    assert retry.model_id == "m" and retry.state in (ModelState.LOADING, ModelState.ACTIVE)
    assert (await first).state is ModelState.ACTIVE
    await h.close()


async def test_a_retry_of_a_call_cancelled_while_validating_is_told_so(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    m = h.manager
    ckpt = many_tensors(tmp_path / "big.safetensors")
    first = asyncio.create_task(m.load("m", ckpt, request_id="r1"))
    while "m" not in m.registry.validating:
        await asyncio.sleep(0)
    retry = asyncio.create_task(m.load("m", ckpt, request_id="r1"))
    await asyncio.sleep(0)
    first.cancel()  # (its caller went away)
    with pytest.raises(Aborted) as err:
        await retry
    assert err.value.reason == "CANCELLED" and "send it again" in err.value.message
    with pytest.raises(asyncio.CancelledError):
        await first
    assert "m" not in m.registry.models and "m" not in m.registry.validating
    assert (await m.load("m", ckpt, request_id="r1")).state is ModelState.ACTIVE  # anew
    await h.close()
