"""The scrubber: its pace, its walk, what a corrupt copy does, and how it
stands aside for transitions (core/scrubber.py, core/corrupt.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from torpor.testing import make_checkpoint
from torpord.backends.base import Slab
from torpord.backends.host import HostBackend
from torpord.core.events import EventType
from torpord.core.scrubber import PIECE, POLL, TokenBucket
from torpord.errors import DataLoss
from torpord.metrics.state import State
from torpord.storage.catalogue import CatalogueGroup, CatalogueTensor
from torpord.storage.diskcache import DATA_OFFSET, DiskCache, DiskEntry
from torpord.storage.fileio import Buffer, SystemIO
from torpord.types import ModelState, Tier

from .harness import Harness, MiB, disk_harness, tiers
from .scrubkit import FakeTime, scrubber


def big(tmp_path: Path) -> Path:
    """Layers of ~11 MiB: two pieces each."""
    return make_checkpoint(tmp_path / "big", layers=2, hidden=768)


def host_bytes(h: Harness, model_id: str) -> int:
    model = h.manager.registry.models[model_id]
    return sum(s.size for s in model.slabs() if s.tier is Tier.HOST)


def corrupt(h: Harness, slab: Slab, at: int) -> None:
    with h.backend.view(slab) as view:
        view[at] ^= 0xFF


def checksum_failures(h: Harness) -> dict[str, float]:
    """torpor_checksum_failures_total by tier, as /metrics has it."""
    (family,) = [f for f in State(h.manager).collect() if f.name == "torpor_checksum_failures"]
    return {sample.labels["tier"]: sample.value for sample in family.samples}


async def freed(h: Harness) -> None:
    """The scrubber's frees done, and the memory back."""
    assert h.manager.scrubber is not None
    await h.manager.scrubber.stop()
    h.backend.drain()


def test_the_bucket_allows_a_burst_then_the_rate() -> None:
    t = FakeTime()
    bucket = TokenBucket(rate=100, burst=50, clock=t.clock)
    assert bucket.take(50) == 0
    assert bucket.take(10) == pytest.approx(0.1)  # 10 over: 0.1 s at 100/s
    t.now += 0.1
    assert bucket.take(20) == pytest.approx(0.2)
    t.now += 3600  # (idle: the bucket fills up to its burst, no more)
    assert bucket.take(50) == 0
    assert bucket.take(1) == pytest.approx(0.01)


async def test_a_sweep_reads_at_most_rate_bytes_a_second(tmp_path: Path) -> None:
    h = Harness(tmp_path, device_capacity=128 * MiB, host_capacity=128 * MiB)
    t = FakeTime()
    s = scrubber(h, t, rate=4 * MiB)
    try:
        await h.manager.load("m", str(big(tmp_path)))
        await h.manager.sleep("m", 1)
        total = host_bytes(h, "m")
        assert total > 2 * PIECE
        await s.sweep()
        assert s.checked_bytes == {Tier.HOST: total, Tier.DISK: 0}
        assert s.corrupt == {Tier.HOST: 0, Tier.DISK: 0}
        # A burst of one piece, then rate bytes for each second slept.
        assert sum(t.slept) == pytest.approx((total - PIECE) / (4 * MiB))
    finally:
        await s.stop()
        await h.close()


async def test_a_model_in_a_transition_is_skipped(h: Harness, ckpt: Path) -> None:
    t = FakeTime()
    s = scrubber(h, t, rate=1 << 40)
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.sleep("m", 1)
        await h.manager.wake("m", wait=False)
        assert h.manager.registry.models["m"].busy
        await s.sweep()
        assert s.checked_bytes[Tier.HOST] == 0
        task = h.manager.registry.models["m"].task
        assert task is not None
        await task
    finally:
        await s.stop()


async def test_a_due_copy_of_a_busy_model_is_tried_again_a_poll_later(
    h: Harness, ckpt: Path
) -> None:
    # (Not at once: the walk would spin on the event loop for as long as the
    # transition runs, or for good for a model left FAILED holding copies.)
    t = FakeTime()
    s = scrubber(h, t, rate=1 << 40, interval=60)
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.sleep("m", 1)
        await s.sweep()  # (it sees its copies)
        t.now += 60  # (and they are due)
        await h.manager.wake("m", wait=False)
        assert await s.sweep() == POLL
        assert s.checked_bytes[Tier.HOST] == 0
        task = h.manager.registry.models["m"].task
        assert task is not None
        await task
    finally:
        await s.stop()


async def test_a_transition_that_begins_between_pieces_ends_the_check(tmp_path: Path) -> None:
    h = Harness(tmp_path, device_capacity=128 * MiB, host_capacity=128 * MiB)
    t = FakeTime()
    s = scrubber(h, t, rate=1 * MiB)
    woke: list[asyncio.Future[Any]] = []

    def wake() -> None:
        if not woke:  # the first pause between two pieces: a caller wakes the model
            woke.append(asyncio.ensure_future(h.manager.wake("m")))

    t.on_sleep = wake
    try:
        await h.manager.load("m", str(big(tmp_path)))
        await h.manager.sleep("m", 1)
        total = host_bytes(h, "m")
        await s.sweep()
        assert woke and t.slept  # (it paused, and the wake began there)
        m = await woke[0]
        assert m.state is ModelState.ACTIVE
        h.check_bytes("m")
        assert s.checked_bytes[Tier.HOST] < total  # the check was abandoned
        h.backend.drain()
        assert h.backend.host_pool().used == 0
    finally:
        await s.stop()
        await h.close()


class HeldRead(HostBackend):
    """A host backend whose scrubber reads stop, holding their view, until let go."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.reading = threading.Event()
        self.go = threading.Event()

    def view(self, slab: Slab) -> memoryview:
        view = super().view(slab)
        if threading.current_thread().name.startswith("torpord-scrub") and not self.go.is_set():
            self.reading.set()
            self.go.wait(30)
        return view


async def test_a_wake_waits_for_the_piece_being_read_then_frees_safely(tmp_path: Path) -> None:
    h = Harness(
        tmp_path,
        device_capacity=128 * MiB,
        host_capacity=128 * MiB,
        backend=HeldRead,
        scrub_rate=1 << 40,
        scrub_interval=0,
    )
    backend = h.backend
    assert isinstance(backend, HeldRead) and h.manager.scrubber is not None
    try:
        await h.manager.load("m", str(big(tmp_path)))
        await h.manager.sleep("m", 1)
        model = h.manager.registry.models["m"]
        slabs = model.slabs()
        h.manager.scrubber.start()
        assert await asyncio.to_thread(backend.reading.wait, 30)
        await h.manager.wake("m", wait=False)
        for _ in range(20):  # (the wake gets every chance to go ahead; it must not)
            await asyncio.sleep(0.01)
        assert model.state is ModelState.WAKING
        assert not any(slab.freed for slab in slabs)
        backend.go.set()
        assert model.task is not None
        m = await model.task
        assert m.state is ModelState.ACTIVE
        h.check_bytes("m")
        await freed(h)
        assert all(slab.freed for slab in slabs)  # freed by the wake, none left behind
        assert h.backend.host_pool().used == 0
    finally:
        backend.go.set()
        await h.close()


async def test_clean_copies_are_left_alone(tmp_path: Path, ckpt: Path) -> None:
    h = disk_harness(tmp_path, scrub_rate=1 << 40, scrub_interval=0)
    assert h.manager.scrubber is not None
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.offload("m", ["layers.0"], Tier.HOST)
        await h.manager.offload("m", ["layers.1"], Tier.DISK)
        before = h.manager.get("m")
        await h.manager.scrubber.sweep()
        after = h.manager.get("m")
        assert (after.state, after.state_reason, tiers(after)) == (
            before.state,
            "",
            tiers(before),
        )
        sizes = [layer.plan.size for layer in after.layers]
        assert h.manager.scrubber.checked_bytes == {Tier.HOST: sizes[1], Tier.DISK: sizes[2]}
        assert h.manager.scrubber.corrupt == {Tier.HOST: 0, Tier.DISK: 0}
    finally:
        await h.close()


async def test_a_corrupt_host_copy_of_a_level_1_sleeper(tmp_path: Path, ckpt: Path) -> None:
    h = Harness(tmp_path, scrub_rate=1 << 40, scrub_interval=0)
    assert h.manager.scrubber is not None
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.sleep("m", 1)
        events = h.manager.bus.subscribe("m")
        slab = h.manager.registry.models["m"].layers[2].slab
        assert slab is not None
        corrupt(h, slab, 100)
        await h.manager.scrubber.sweep()
        m = h.manager.get("m")
        assert (m.state, m.sleep_level, m.state_reason) == (
            ModelState.ASLEEP,
            2,
            "HOST_COPY_CORRUPT",
        )
        assert "layers.1" in m.state_message and "source" in m.state_message
        assert set(tiers(m)) == {Tier.SOURCE}
        assert h.manager.scrubber.corrupt == {Tier.HOST: 1, Tier.DISK: 0}
        events.close()
        seen = [(e.type, e.model.state_reason) async for e in events]
        assert seen == [(EventType.CHANGED, "HOST_COPY_CORRUPT")]
        await freed(h)
        assert h.backend.host_pool().used == 0
        # A wake reads every layer from the source again, checked.
        m = await h.manager.wake("m")
        assert m.state is ModelState.ACTIVE and m.state_reason == ""
        h.check_bytes("m")
    finally:
        await h.close()


async def test_a_corrupt_layer_offloaded_to_host(h: Harness, ckpt: Path) -> None:
    await h.manager.load("m", str(ckpt))
    await h.manager.offload("m", ["layers.1", "layers.3"], Tier.HOST)
    t = FakeTime()
    scrub = scrubber(h, t, rate=1 << 40)
    try:
        layer = h.manager.registry.models["m"].layers[4]
        assert layer.slab is not None
        corrupt(h, layer.slab, layer.slab.size - 1)
        await scrub.sweep()
        m = h.manager.get("m")
        assert (m.state, m.state_reason) == (ModelState.OFFLOADED, "HOST_COPY_CORRUPT")
        assert "layers.3" in m.state_message
        assert tiers(m)[2] is Tier.HOST and tiers(m)[4] is Tier.SOURCE
        assert scrub.corrupt[Tier.HOST] == 1
        m = await h.manager.wake("m")
        assert m.state is ModelState.ACTIVE
        h.check_bytes("m")
    finally:
        await scrub.stop()
        h.backend.drain()
    assert h.backend.host_pool().used == 0


async def test_a_corrupt_host_copy_of_an_image_says_it_is_lost(tmp_path: Path) -> None:
    h = Harness(tmp_path, scrub_rate=1 << 40, scrub_interval=0)
    assert h.manager.scrubber is not None
    try:
        groups = [
            CatalogueGroup(name, 4096, (CatalogueTensor(f"{name}.w", "U8", (4096,), 0),))
            for name in ("pre", "layers.0", "post")
        ]
        model = await h.manager.images.begin("img", "fp", groups, device="", publisher="e")
        for layer in model.layers:
            assert layer.slab is not None
            with h.backend.view(layer.slab) as view:
                view[:] = layer.plan.name.encode().ljust(4096, b".")
        await h.manager.images.commit("img", "e")
        await h.manager.sleep("img", 1)
        slab = model.layers[1].slab
        assert slab is not None
        corrupt(h, slab, 0)
        await h.manager.scrubber.sweep()
        m = h.manager.get("img")
        assert (m.state, m.sleep_level, m.state_reason) == (
            ModelState.ASLEEP,
            2,
            "HOST_COPY_CORRUPT",
        )
        assert "unload it and publish it again" in m.state_message
        with pytest.raises(DataLoss) as err:  # (never the corrupt bytes)
            await h.manager.wake("img")
        assert err.value.reason == "IMAGE_LOST"
    finally:
        await h.close()


@pytest.mark.parametrize("how", ["flipped", "truncated", "deleted"])
async def test_a_corrupt_disk_copy_of_a_level_2_sleeper(
    tmp_path: Path, ckpt: Path, how: str
) -> None:
    h = disk_harness(tmp_path, scrub_rate=1 << 40, scrub_interval=0)
    assert h.manager.scrubber is not None and h.manager.disk is not None
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.sleep("m", 2, disk_copy=True)
        entry = h.manager.registry.models["m"].layers[3].disk
        assert entry is not None
        if how == "flipped":
            with open(entry.path, "r+b") as f:
                f.seek(DATA_OFFSET + 7)
                byte = f.read(1)
                f.seek(DATA_OFFSET + 7)
                f.write(bytes([byte[0] ^ 1]))
        elif how == "truncated":
            os.truncate(entry.path, entry.file_bytes - 1)
        else:
            entry.path.unlink()
        await h.manager.scrubber.sweep()
        m = h.manager.get("m")
        assert (m.state, m.sleep_level, m.state_reason) == (
            ModelState.ASLEEP,
            2,
            "DISK_COPY_CORRUPT",
        )
        assert "layers.2" in m.state_message
        assert tiers(m) == [Tier.DISK] * 3 + [Tier.SOURCE] + [Tier.DISK] * 4
        assert h.manager.scrubber.corrupt == {Tier.HOST: 0, Tier.DISK: 1}
        assert h.manager.disk.get(entry.key) is None and not entry.path.exists()
        m = await h.manager.wake("m", verify=True)
        assert m.state is ModelState.ACTIVE
        h.check_bytes("m")
    finally:
        await h.close()


async def test_a_corrupt_entry_no_model_uses_is_removed(tmp_path: Path, ckpt: Path) -> None:
    h = disk_harness(tmp_path, scrub_rate=1 << 40, scrub_interval=0)
    scrub, disk = h.manager.scrubber, h.manager.disk
    assert scrub is not None and disk is not None
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.offload("m", ["layers.0", "layers.1"], Tier.DISK)
        await h.manager.unload("m")
        left = sorted(disk.entries(), key=lambda e: e.key)
        assert len(left) == 2  # (copies outlive their model: a load may take them)
        os.truncate(left[0].path, DATA_OFFSET + 10)
        await scrub.sweep()
        assert disk.entries() == [left[1]] and not left[0].path.exists()
        assert scrub.corrupt == {Tier.HOST: 0, Tier.DISK: 1}
        assert scrub.checked_bytes[Tier.DISK] == left[1].size
        m = await h.manager.load("m", str(ckpt), target=Tier.HOST)
        assert m.state is ModelState.ASLEEP
        h.check_bytes("m")
    finally:
        await h.close()


class StuckScrubReads(SystemIO):
    """A disk whose reads on the scrubber's thread never return (until let go)."""

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.go = threading.Event()

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
        if threading.current_thread().name.startswith("torpord-scrub"):
            self.reading.set()
            self.go.wait(60)
        return super().preadv(fd, buffers, offset, flags)


async def test_shutdown_does_not_wait_for_a_disk_read_that_never_returns(
    tmp_path: Path, ckpt: Path
) -> None:
    io = StuckScrubReads()
    h = disk_harness(tmp_path, io=io, scrub_rate=1 << 40, scrub_interval=0)
    assert h.manager.scrubber is not None
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.sleep("m", 2, disk_copy=True)
        h.manager.scrubber.start()
        assert await asyncio.to_thread(io.reading.wait, 30)
        # Left behind, as a transition's stuck read is: the answer says so.
        assert await h.manager.close(0.1, rollback=0.1) is False
    finally:
        io.go.set()
        h.backend.close()


class HeldOpen(DiskCache):
    """A disk cache whose entries the scrubber opens only once let go."""

    def __init__(self, root: Path, capacity: int) -> None:
        super().__init__(root, capacity)
        self.opening = threading.Event()
        self.go = threading.Event()

    def open_entry(self, entry: DiskEntry) -> int:
        if threading.current_thread().name.startswith("torpord-scrub"):
            self.opening.set()
            self.go.wait(30)
        return super().open_entry(entry)


def open_fds_of(path: Path) -> list[str]:
    """This process's fds open on `path`."""
    fds = Path("/proc/self/fd")
    out = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == str(path):
                out.append(fd.name)
    return out


async def test_a_scrubber_stopped_while_it_opens_a_disk_copy_closes_it(
    tmp_path: Path, ckpt: Path
) -> None:
    h = Harness(tmp_path, scrub_rate=1 << 40, scrub_interval=0)
    scrub = h.manager.scrubber
    assert scrub is not None
    disk = h.manager.disk = h.manager.mover.disk = HeldOpen(tmp_path / "cache", 64 * MiB)
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.sleep("m", 2, disk_copy=True)
        entry = h.manager.registry.models["m"].layers[0].disk
        assert entry is not None
        scrub.start()
        assert await asyncio.to_thread(disk.opening.wait, 30)
        stopping = asyncio.ensure_future(scrub.stop())  # (the daemon stops)
        await asyncio.sleep(0)
        disk.go.set()  # (the open returns after the scrubber was told to stop)
        assert await stopping
        assert open_fds_of(entry.path) == []
    finally:
        disk.go.set()
        await h.close()


async def test_no_scrubber_when_the_rate_is_0(h: Harness) -> None:
    assert h.manager.scrubber is None


class HeldSlab(HostBackend):
    """A host backend whose scrubber reads of the slab `held` stop, holding
    their view: the first until `go`, any later one until `again`."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.held = -1
        self.reads = 0
        self.reading = threading.Event()
        self.go = threading.Event()
        self.again = threading.Event()

    def view(self, slab: Slab) -> memoryview:
        view = super().view(slab)
        if threading.current_thread().name.startswith("torpord-scrub") and slab.id == self.held:
            self.reads += 1
            self.reading.set()
            (self.go if self.reads == 1 else self.again).wait(30)
        return view


async def test_a_copy_found_corrupt_as_a_wake_begins_is_never_served(
    tmp_path: Path, ckpt: Path
) -> None:
    # The wake begins while the scrubber reads the last piece of a corrupt
    # copy: the scrubber can't act (the wake owns the model now), and the
    # wake must not copy what it found corrupt to the device.
    h = Harness(tmp_path, backend=HeldSlab, scrub_rate=1 << 40, scrub_interval=0)
    backend = h.backend
    assert isinstance(backend, HeldSlab) and h.manager.scrubber is not None
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.sleep("m", 1)
        model = h.manager.registry.models["m"]
        slab = model.layers[0].slab  # (the first copy checked: one piece)
        assert slab is not None and slab.size <= PIECE
        corrupt(h, slab, 3)
        backend.held = slab.id
        h.manager.scrubber.start()
        assert await asyncio.to_thread(backend.reading.wait, 30)
        await h.manager.wake("m", wait=False)
        backend.go.set()
        assert model.task is not None
        with pytest.raises(DataLoss) as err:
            await model.task
        assert err.value.reason == "CHECKSUM_MISMATCH"
        assert model.state is ModelState.ASLEEP
        # Once the model is at rest, the scrubber refuses the copy at its next
        # walk, on what it found (it does not read it again: its reads of that
        # slab wait for good now). A wake then reads the layers again, checked.
        for _ in range(1000):
            if model.state_reason == "HOST_COPY_CORRUPT":
                break
            await asyncio.sleep(0.01)
        assert (model.state, model.sleep_level) == (ModelState.ASLEEP, 2)
        assert h.manager.scrubber.corrupt[Tier.HOST] == 1 and backend.reads == 1
        # One corrupt copy, found by the scrubber then by the wake's verify: counted once.
        assert checksum_failures(h) == {"source": 0, "disk": 0, "host": 1, "device": 0}
        m = await h.manager.wake("m")
        assert m.state is ModelState.ACTIVE
        h.check_bytes("m")
    finally:
        backend.go.set()
        backend.again.set()
        await h.close()
