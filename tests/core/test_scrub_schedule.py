"""When the scrubber checks each copy, and in what order (core/scrubplan.py):
a new copy soon after it is made, whatever the interval; then each interval;
never-checked copies first, then the oldest check."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from torpor.testing import make_checkpoint
from torpord.backends.base import Slab
from torpord.backends.host import HostBackend
from torpord.core.scrubber import POLL
from torpord.core.scrubplan import SETTLE, Schedule
from torpord.types import Tier

from .harness import Harness, MiB
from .scrubkit import FakeTime, scrubber


class ReadOrder(HostBackend):
    """A host backend that notes which slabs the scrubber reads, in order."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.read: list[int] = []

    def view(self, slab: Slab) -> memoryview:
        scrubbing = threading.current_thread().name.startswith("torpord-scrub")
        if scrubbing and self.read[-1:] != [slab.id]:  # (a copy's pieces: once)
            self.read.append(slab.id)
        return super().view(slab)


def slab_id(h: Harness, model_id: str, layer: str) -> int:
    model = h.manager.registry.models[model_id]
    (slab,) = [lay.slab for lay in model.layers if lay.plan.name == layer]
    assert slab is not None and slab.tier is Tier.HOST
    return slab.id


def test_the_schedule_of_one_copy() -> None:
    t = FakeTime()
    s = Schedule(3600.0, t.clock)
    s.track({("host", 1)})
    assert s.due(("host", 1)) == t.now + SETTLE  # (new: soon)
    assert s.wait(set(), POLL) == POLL
    t.now += SETTLE
    assert s.wait(set(), POLL) == 0
    s.checked(("host", 1))
    assert s.due(("host", 1)) == t.now + 3600  # (then each interval)
    s.track(set())  # (gone: forgotten)
    s.track({("host", 1)})
    assert s.due(("host", 1)) == t.now + SETTLE
    # A shorter interval than SETTLE is the first wait too (0: no wait at all).
    assert Schedule(0.0, t.clock).settle == 0 and Schedule(2.0, t.clock).settle == 2


async def test_a_new_copy_is_checked_within_seconds_then_each_interval(
    h: Harness, ckpt: Path
) -> None:
    t = FakeTime()
    s = scrubber(h, t, rate=1 << 40, interval=3600)
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.offload("m", ["layers.1", "layers.2"], Tier.HOST)
        once = sum(s.size for s in h.manager.registry.models["m"].slabs() if s.tier is Tier.HOST)
        assert 0 < await s.sweep() <= POLL
        assert s.checked_bytes[Tier.HOST] == 0  # (just made)
        t.now += SETTLE
        await s.sweep()
        assert s.checked_bytes[Tier.HOST] == once  # (not an hour later)
        t.now += 3599
        await s.sweep()
        assert s.checked_bytes[Tier.HOST] == once
        t.now += 1
        await s.sweep()
        assert s.checked_bytes[Tier.HOST] == 2 * once
        # A new copy (a new slab) is checked soon too, the others an hour on.
        await h.manager.offload("m", ["layers.3"], Tier.HOST)
        await s.sweep()
        t.now += SETTLE
        await s.sweep()
        assert s.checked_bytes[Tier.HOST] == 2 * once + h.manager.get("m").layers[4].plan.size
    finally:
        await s.stop()


async def test_never_checked_copies_go_first_then_the_oldest_check(
    tmp_path: Path, ckpt: Path
) -> None:
    h = Harness(tmp_path, backend=ReadOrder)
    backend = h.backend
    assert isinstance(backend, ReadOrder)
    t = FakeTime()
    s = scrubber(h, t, rate=1 << 40, interval=60)
    try:
        await h.manager.load("m", str(ckpt))
        made = {}
        for at, layer in ((1000, "layers.3"), (1002, "layers.1")):
            t.now = at
            await h.manager.offload("m", [layer], Tier.HOST)
            await s.sweep()  # (seen now)
            made[layer] = slab_id(h, "m", layer)
        a, b = made["layers.3"], made["layers.1"]
        t.now = 1006
        await s.sweep()
        t.now = 1008
        await s.sweep()
        assert backend.read == [a, b]  # (a checked at 1006, b at 1008: due then)
        for at, layer in ((1060, "layers.4"), (1062, "layers.2")):
            t.now = at
            await h.manager.offload("m", [layer], Tier.HOST)
            await s.sweep()
            made[layer] = slab_id(h, "m", layer)
        c, d = made["layers.4"], made["layers.2"]
        assert [slab_id(h, "m", layer) for layer in ("layers.3", "layers.1")] == [a, b]
        backend.read.clear()
        # Due: c at 1065, a at 1066, d at 1067, b at 1068; in the model: b, d, a, c.
        t.now = 1070
        await s.sweep()
        assert backend.read == [c, d, a, b]  # never checked first, the first seen first;
        # then the oldest check first
    finally:
        await s.stop()
        await h.close()


async def test_a_copy_made_during_a_long_sweep_does_not_wait_for_its_end(
    tmp_path: Path, ckpt: Path
) -> None:
    h = Harness(tmp_path, backend=ReadOrder, device_capacity=128 * MiB, host_capacity=128 * MiB)
    backend = h.backend
    assert isinstance(backend, ReadOrder)
    t = FakeTime()
    s = scrubber(h, t, rate=1 * MiB, interval=3600)
    try:
        await h.manager.load("big", str(make_checkpoint(tmp_path / "big", layers=4, hidden=512)))
        await h.manager.sleep("big", 1)
        await h.manager.load("m", str(ckpt))
        await s.sweep()
        t.now += SETTLE
        await s.sweep()  # (their first check: each takes seconds at this rate)
        rechecks = list(backend.read)
        assert len(rechecks) > 3
        backend.read.clear()
        t.now += 3600  # (all due again)

        async def offload() -> None:  # (as the first re-check begins)
            t.on_sleep = None
            await h.manager.offload("m", ["layers.0"], Tier.HOST)

        t.on_sleep = offload
        await s.sweep()
        new = slab_id(h, "m", "layers.0")
        # Checked once due, before the re-checks left then; not after them all.
        assert sorted(backend.read) == sorted([*rechecks, new])
        assert backend.read.index(new) < len(rechecks)
    finally:
        await s.stop()
        await h.close()
