"""Publishing an image racing everything else that can happen to it.

The real registry of engines, the real manager and host backend; the
publisher is this process (its fds are real, its pid is ours). Randomized
but seeded and bounded: each try lets the event loop run a random number
of steps (none included) or a few milliseconds between two things, and
whatever point that lands on, the outcome is one of the allowed ones and
the memory is all accounted for.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from torpor.testing import make_checkpoint
from torpord.backends.base import Slab
from torpord.backends.host import HostBackend
from torpord.core.attachments.attachment import Attachment
from torpord.core.attachments.messages import Ended, Hello, Publish, Published
from torpord.core.attachments.registry import AgentRegistry
from torpord.errors import AlreadyExists, FailedPrecondition, TorporError
from torpord.storage.catalogue import CatalogueGroup, CatalogueTensor
from torpord.types import ModelState, Tier

from .harness import Harness

TRIES = 60
PID = os.getpid()


def groups(n: int = 3, size: int = 64 * 1024) -> tuple[CatalogueGroup, ...]:
    return tuple(
        CatalogueGroup(f"g{i}", size, (CatalogueTensor(f"t{i}", "U8", (size,), 0),))
        for i in range(n)
    )


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.h = Harness(tmp)
        self.m = self.h.manager
        # (This publisher never answers a Quiesce: the engine is revoked soon.)
        self.agents = AgentRegistry(self.m, quiesce_timeout=0.05)
        self.m.use_engines(self.agents)

    async def publisher(self, model_id: str, fingerprint: str = "fp") -> Attachment:
        """A publisher that has written every slab and unmapped them."""
        hello = Hello(model_id=model_id, pid=PID, publish=Publish(fingerprint, groups()))
        attachment = await self.agents.publish(hello)
        header, fds = await self.agents.export(attachment.id, PID, [])
        assert header["writable"]
        for layer, fd in zip(header["layers"], fds, strict=True):
            with mmap.mmap(fd, layer["size"]) as mm:
                mm[:] = b"\x05" * layer["size"]
            os.close(fd)
        return attachment

    async def settled(self) -> None:
        """Every abandoned slab freed (on workers) and returned."""
        for _ in range(1000):
            if self.h.device_used() == self.expected():
                break
            await asyncio.sleep(0.01)
        self.h.backend.drain()

    def expected(self) -> int:
        return sum(
            layer.plan.size
            for model in self.m.registry.models.values()
            for layer in model.layers
            if layer.tier is Tier.DEVICE
        )


@pytest.fixture
async def s(tmp_path: Path) -> AsyncIterator[Setup]:
    setup = Setup(tmp_path)
    yield setup
    await setup.agents.shutdown(1.0)
    await setup.h.close()


async def pause(rng: random.Random) -> None:
    if rng.random() < 0.7:
        for _ in range(rng.randint(0, 8)):
            await asyncio.sleep(0)
    else:
        await asyncio.sleep(rng.random() * 0.003)


async def messages(attachment: Attachment) -> list[object]:
    """What the publisher's stream says, up to its end (or Published)."""
    out: list[object] = []
    while True:
        item = await asyncio.wait_for(attachment.outbox.get(), 30)
        out.append(item)
        if isinstance(item, Ended | Published):
            return out


async def test_a_forced_unload_during_a_commit_unloads(s: Setup) -> None:
    """Wherever it lands (before the commit's transition, in it, after it),
    the Unload answers UNLOADED, never MODEL_NOT_FOUND: the publisher's
    stream ending with the cancelled commit removes the image too."""
    rng = random.Random(1302)
    ends: dict[str, int] = {}
    for _ in range(TRIES):
        attachment = await s.publisher("img")
        s.agents.commit(attachment)
        await pause(rng)
        gone = await s.m.unload("img", force=True)
        assert gone.state is ModelState.UNLOADED
        assert "img" not in s.m.registry.models
        said = await messages(attachment)
        end = said[-1]
        if isinstance(end, Ended):
            ends[end.error.reason] = ends.get(end.error.reason, 0) + 1
        else:
            assert isinstance(end, Published)
            ends["PUBLISHED"] = ends.get("PUBLISHED", 0) + 1
        await s.settled()
        assert s.h.device_used() == 0
    assert ends.get("CANCELLED", 0) > 0, ends  # (the commit was cut short)


async def test_the_publisher_going_during_a_commit(s: Setup) -> None:
    """Its stream ends (the servicer detaches it) at any point of the commit:
    the image is then either committed (ACTIVE, sealed, checksummed: the
    engine had written and unmapped it) or gone, never stuck."""
    rng = random.Random(1303)
    outcomes = {"active": 0, "gone": 0}
    for _ in range(TRIES):
        attachment = await s.publisher("img")
        s.agents.commit(attachment)
        await pause(rng)
        s.agents.detach(attachment.id)
        assert attachment.committing is not None
        await asyncio.wait([attachment.committing])
        for _ in range(100):  # (an abandon waiting for the commit runs after it)
            await asyncio.sleep(0)
        model = s.m.registry.find("img")
        if model is None:
            outcomes["gone"] += 1
        else:
            assert model.state is ModelState.ACTIVE and not model.publisher
            assert all(layer.checksum for layer in model.layers)
            outcomes["active"] += 1
            await s.m.unload("img")
        await s.settled()
        assert s.h.device_used() == 0
    assert outcomes["active"] > 0


async def test_slabs_are_never_handed_out_writable_once_the_commit_began(s: Setup) -> None:
    rng = random.Random(1304)
    for _ in range(TRIES):
        attachment = await s.publisher("img")
        s.agents.commit(attachment)
        await pause(rng)
        model = s.m.registry.models["img"]
        publishing = model.state is ModelState.PUBLISHING
        try:
            header, fds = await s.agents.export(attachment.id, PID, [])
        except FailedPrecondition as err:
            # (Said Commit: while the model is PUBLISHING, no more fds.)
            assert err.reason == "MODEL_NOT_ACTIVE"
            assert publishing
        else:
            for fd in fds:
                os.close(fd)
            # Committed by now: what it takes is read-only.
            assert not publishing and header["writable"] is False
        said = await messages(attachment)
        assert isinstance(said[-1], Published), said
        s.agents.released(attachment)  # (it maps none of the fds it took: as the agent says)
        s.agents.detach(attachment.id)
        await s.m.unload("img")
        await s.settled()


async def test_begins_and_loads_racing_for_one_id_or_fingerprint(s: Setup, tmp_path: Path) -> None:
    """Two publishers (same id, or same fingerprint) or a publisher and a Load
    of the same id, started in a random order and a random number of loop
    steps apart: exactly one wins, the other is ALREADY_EXISTS (or busy),
    and only the winner holds memory."""
    ckpt = str(make_checkpoint(tmp_path / "m", layers=2, hidden=64))
    rng = random.Random(1305)

    def begin(model_id: str, fingerprint: str) -> Callable[[], Awaitable[object]]:
        return lambda: s.agents.publish(
            Hello(model_id=model_id, pid=PID, publish=Publish(fingerprint, groups()))
        )

    pairs = {
        "same id": (begin("a", "fp1"), begin("a", "fp2")),
        "same fingerprint": (begin("a", "fp"), begin("b", "fp")),
        "publish and load": (begin("a", "fp"), lambda: s.m.load("a", ckpt)),
    }
    for name, (first, second) in pairs.items():
        for _ in range(TRIES // 3):
            one, other = (first, second) if rng.random() < 0.5 else (second, first)
            task = asyncio.ensure_future(one())
            await pause(rng)
            results = await asyncio.gather(task, other(), return_exceptions=True)
            won = [r for r in results if not isinstance(r, BaseException)]
            lost = [r for r in results if isinstance(r, BaseException)]
            assert len(won) == 1, (name, results)
            (err,) = lost
            assert isinstance(err, TorporError), (name, err)
            assert isinstance(err, AlreadyExists) or err.reason == "TRANSITION_IN_PROGRESS", err
            assert len(s.m.registry.models) == 1
            assert s.h.device_used() == s.expected()
            for attachment in [w for w in won if isinstance(w, Attachment)]:
                s.agents.detach(attachment.id)  # (abandoned: removed)
            for model_id in list(s.m.registry.models):
                await s.m.unload(model_id)
            await s.settled()
            assert s.h.device_used() == 0 and not s.m.registry.models


async def test_a_publishing_model_refuses_every_verb_but_a_forced_unload(s: Setup) -> None:
    attachment = await s.publisher("img")
    before = s.m.registry.models["img"].snapshot()
    verbs: dict[str, Callable[[], Awaitable[object]]] = {
        "sleep1": lambda: s.m.sleep("img", 1),
        "sleep2": lambda: s.m.sleep("img", 2),
        "wake": lambda: s.m.wake("img"),
        "offload": lambda: s.m.offload("img", ["g1"], Tier.HOST),
        "unload": lambda: s.m.unload("img"),
    }
    for name, verb in verbs.items():
        with pytest.raises(TorporError) as err:
            await verb()
        assert err.value.code.value in ("FAILED_PRECONDITION", "ABORTED"), (name, err.value)
        assert s.m.registry.models["img"].snapshot() == before, name
    with pytest.raises(TorporError) as err:
        s.agents.attach(Hello(model_id="img", pid=PID))
    assert err.value.reason == "MODEL_NOT_ACTIVE"
    # (It unmapped what it wrote, and says so: else the image's slabs, sealed
    # against shrinking, would count as held for this process until it exits.)
    s.agents.released(attachment)
    gone = await s.m.unload("img", force=True)
    assert gone.state is ModelState.UNLOADED
    assert isinstance((await messages(attachment))[-1], Ended)
    await s.settled()
    assert s.h.device_used() == 0


class OneSealFails(HostBackend):
    """g0's seal fails at once; g1's waits until the test lets it go."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.g1_may_go = threading.Event()
        self.order: list[str] = []

    def seal(self, slab: Slab) -> None:
        if slab.owner.layer == "g0":
            raise FailedPrecondition("g0 cannot be sealed", reason="STILL_MAPPED_WRITABLE")
        if slab.owner.layer == "g1":
            assert self.g1_may_go.wait(30)
            self.order.append("g1 sealed")
        super().seal(slab)


async def test_a_failed_seal_waits_for_the_others_before_rolling_back(tmp_path: Path) -> None:
    h = Harness(tmp_path, backend=OneSealFails)
    backend = h.backend
    assert isinstance(backend, OneSealFails)
    m = h.manager
    try:
        await m.images.begin("img", "fp", groups(), device="", publisher="me")
        commit = asyncio.ensure_future(m.images.commit("img", "me"))
        commit.add_done_callback(lambda _: backend.order.append("commit done"))
        await asyncio.sleep(0.05)  # (g0 has failed by now; g1 is still sealing)
        backend.g1_may_go.set()
        with pytest.raises(FailedPrecondition):
            await commit
        # The rollback (and a free after it) came after every seal ended.
        assert backend.order == ["g1 sealed", "commit done"]
        assert m.registry.models["img"].state is ModelState.FAILED
        m.images.abandon("img", "me")
        for _ in range(1000):
            if h.device_used() == 0:
                break
            await asyncio.sleep(0.01)
        assert h.device_used() == 0
    finally:
        backend.g1_may_go.set()
        await h.close()
