"""The model manager with the real host backend: states, bytes, rollback."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from torpor.testing import make_checkpoint
from torpord.backends.base import Slab
from torpord.backends.host import HostBackend
from torpord.core.events import EventType
from torpord.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from torpord.storage.checkpoint import open_checkpoint
from torpord.storage.chunks import plan_chunks
from torpord.storage.fileio import Buffer, SystemIO
from torpord.storage.layers import plan_layers
from torpord.storage.pipeline import ReadOptions
from torpord.types import ModelState, Outcome, Stage, Tier

from .harness import Harness, MiB, tiers


async def test_full_lifecycle_moves_real_bytes(h: Harness, ckpt: Path) -> None:
    m = await h.manager.load("m", str(ckpt))
    assert m.state is ModelState.ACTIVE
    assert [layer.plan.name for layer in m.layers] == [
        "pre",
        *(f"layers.{i}" for i in range(6)),
        "post",
    ]
    assert set(tiers(m)) == {Tier.DEVICE}
    assert h.device_used() == m.total_bytes
    h.check_bytes("m")

    m = await h.manager.sleep("m", 1)
    assert (m.state, m.sleep_level) == (ModelState.ASLEEP, 1)
    assert set(tiers(m)) == {Tier.HOST} and h.device_used() == 0
    assert h.backend.host_pool().used == m.total_bytes
    h.check_bytes("m")

    m = await h.manager.wake("m")
    assert m.state is ModelState.ACTIVE and h.backend.host_pool().used == 0
    h.check_bytes("m")

    m = await h.manager.sleep("m", 2)
    assert (m.state, m.sleep_level) == (ModelState.ASLEEP, 2)
    assert set(tiers(m)) == {Tier.SOURCE}
    assert h.device_used() == 0 and h.backend.host_pool().used == 0

    m = await h.manager.wake("m")
    assert m.state is ModelState.ACTIVE
    h.check_bytes("m")

    m = await h.manager.offload("m", ["layers.1", "layers.4"], Tier.HOST)
    assert m.state is ModelState.OFFLOADED
    assert [layer.plan.name for layer in m.layers if layer.tier is Tier.HOST] == [
        "layers.1",
        "layers.4",
    ]
    h.check_bytes("m")

    m = await h.manager.offload("m", [], Tier.DEVICE)
    assert m.state is ModelState.ACTIVE and set(tiers(m)) == {Tier.DEVICE}
    h.check_bytes("m")

    m = await h.manager.unload("m")
    assert h.manager.list_models() == []
    assert h.device_used() == 0 and h.backend.host_pool().used == 0


async def test_repeated_calls_are_no_ops(h: Harness, ckpt: Path) -> None:
    await h.manager.load("m", str(ckpt))
    again = await h.manager.load("m", str(ckpt))
    assert again.last_transition is not None and again.last_transition.outcome is Outcome.SUCCEEDED
    woken = await h.manager.wake("m")
    assert woken.state is ModelState.ACTIVE
    await h.manager.sleep("m", 1)
    m = await h.manager.sleep("m", 1)
    assert (m.state, m.sleep_level) == (ModelState.ASLEEP, 1)
    m = await h.manager.sleep("m", 2)  # deepens: frees the HOST slabs
    assert m.sleep_level == 2 and h.backend.host_pool().used == 0
    m = await h.manager.sleep("m", 2)
    assert m.sleep_level == 2
    m = await h.manager.sleep("m", 1)  # lightens: its weights back in HOST (see below)
    assert m.sleep_level == 1 and h.backend.host_pool().used > 0


async def test_load_to_host_is_a_warm_preload(h: Harness, ckpt: Path) -> None:
    m = await h.manager.load("m", str(ckpt), target=Tier.HOST)
    assert (m.state, m.sleep_level) == (ModelState.ASLEEP, 1)
    assert set(tiers(m)) == {Tier.HOST} and h.device_used() == 0
    m = await h.manager.wake("m")
    assert m.state is ModelState.ACTIVE
    h.check_bytes("m")


async def test_wake_of_offloaded_model_brings_every_layer_back(h: Harness, ckpt: Path) -> None:
    await h.manager.load("m", str(ckpt))
    await h.manager.offload("m", ["pre"], Tier.HOST)
    m = await h.manager.wake("m")
    assert m.state is ModelState.ACTIVE and set(tiers(m)) == {Tier.DEVICE}


async def test_level2_wake_refuses_a_changed_source(h: Harness, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "one.safetensors", layers=2)
    await h.manager.load("m", str(path))
    await h.manager.sleep("m", 2)
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size; modify time put back: only the content differs
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(FailedPrecondition) as err:
        await h.manager.wake("m")
    assert err.value.reason == "SOURCE_CHANGED"
    m = h.manager.get("m")
    assert (m.state, m.sleep_level, m.state_reason) == (ModelState.ASLEEP, 2, "SOURCE_CHANGED")
    assert m.last_transition is not None and m.last_transition.outcome is Outcome.ROLLED_BACK
    assert h.device_used() == 0 and h.backend.host_pool().used == 0


async def test_level2_wake_refuses_a_grown_source(h: Harness, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "one.safetensors", layers=2)
    await h.manager.load("m", str(path))
    await h.manager.sleep("m", 2)
    with open(path, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(FailedPrecondition, match="changed"):
        await h.manager.wake("m")
    assert h.device_used() == 0


async def test_out_of_memory_changes_nothing(tmp_path: Path, ckpt: Path) -> None:
    small = Harness(tmp_path, device_capacity=64 * 1024, host_capacity=64 * MiB)
    try:
        with pytest.raises(ResourceExhausted) as err:
            await small.manager.load("m", str(ckpt))
        assert {"asked", "free", "budget"} <= set(err.value.metadata)
        assert small.manager.list_models() == [] and small.device_used() == 0
    finally:
        await small.close()
    tight = Harness(tmp_path, host_capacity=4096)
    try:
        await tight.manager.load("m", str(ckpt))
        with pytest.raises(ResourceExhausted):
            await tight.manager.sleep("m", 1)
        m = tight.manager.get("m")
        assert m.state is ModelState.ACTIVE and set(tiers(m)) == {Tier.DEVICE}
        assert tight.backend.host_pool().used == 0
        tight.check_bytes("m")
    finally:
        await tight.close()


async def test_failed_read_frees_everything_and_names_a_reason(h: Harness, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "one.safetensors", layers=4)

    class ShrinksMidway(SystemIO):
        reads = 0

        def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
            self.reads += 1
            if self.reads == 20:
                os.truncate(path, 100)  # the file shrinks under the reader
            return super().preadv(fd, buffers, offset, flags)

    h.manager.mover.read_options = ReadOptions(
        chunk_bytes=4096, threads=1, direct="off", io=ShrinksMidway()
    )
    with pytest.raises(FailedPrecondition) as err:
        await h.manager.load("m", str(path))
    assert err.value.reason == "SOURCE_CHANGED"
    m = h.manager.get("m")
    assert m.state is ModelState.FAILED and m.state_reason == "SOURCE_CHANGED"
    assert set(tiers(m)) == {Tier.SOURCE}
    assert h.device_used() == 0
    with pytest.raises(FailedPrecondition):
        await h.manager.wake("m")
    await h.manager.unload("m")
    assert h.manager.list_models() == []


async def test_bad_requests(h: Harness, ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        h.manager.get("nope")
    with pytest.raises(NotFound):
        await h.manager.sleep("nope")
    with pytest.raises(InvalidArgument) as err:
        await h.manager.load("bad id!", str(ckpt))
    assert err.value.reason == "INVALID_MODEL_ID"
    with pytest.raises(InvalidArgument):
        await h.manager.load("m", "relative/path")
    with pytest.raises(PermissionDenied):
        await h.manager.load("m", "/etc/hostname")
    link = tmp_path / "escape"
    link.symlink_to("/etc")
    with pytest.raises(PermissionDenied):
        await h.manager.load("m", str(link / "hostname"))
    with pytest.raises(NotFound) as err:
        await h.manager.load("m", str(tmp_path / "missing.safetensors"))
    with pytest.raises(InvalidArgument) as err:
        await h.manager.load("m", str(ckpt), device="devices/GPU-nope")
    assert err.value.reason == "UNKNOWN_DEVICE"
    await h.manager.load("m", str(ckpt))
    other = make_checkpoint(tmp_path / "other.safetensors", layers=1)
    with pytest.raises(AlreadyExists):
        await h.manager.load("m", str(other))
    with pytest.raises(InvalidArgument) as err:
        await h.manager.offload("m", ["layers.99"], Tier.HOST)
    assert "layers.99" in err.value.message
    with pytest.raises(InvalidArgument):
        await h.manager.sleep("m", 3)
    assert h.manager.list_models()[0].state is ModelState.ACTIVE


async def test_concurrent_mutations_are_refused_not_interleaved(h: Harness, ckpt: Path) -> None:
    m = await h.manager.load("m", str(ckpt), wait=False)
    assert m.state is ModelState.LOADING
    with pytest.raises(Aborted) as err:
        await h.manager.sleep("m", 1)
    assert err.value.reason == "TRANSITION_IN_PROGRESS"
    results = await asyncio.gather(
        *(h.manager.unload("m") for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, Aborted) for r in results)
    task = h.manager.registry.models["m"].task
    assert task is not None
    await task
    assert h.manager.get("m").state is ModelState.ACTIVE
    h.check_bytes("m")


async def test_request_id_replays_the_first_result(h: Harness, ckpt: Path) -> None:
    first = await h.manager.load("m", str(ckpt), request_id="r1")
    await h.manager.sleep("m", 1, request_id="s1")
    await h.manager.wake("m")
    # A retry of the sleep returns the first sleep's result; it does not sleep again.
    replay = await h.manager.sleep("m", 1, request_id="s1")
    assert replay.state is ModelState.ASLEEP
    assert h.manager.get("m").state is ModelState.ACTIVE
    again = await h.manager.load("m", str(ckpt), request_id="r1")
    assert again.create_time == first.create_time
    with pytest.raises(InvalidArgument) as err:
        await h.manager.sleep("m", 2, request_id="s1")
    assert err.value.reason == "REQUEST_ID_REUSED"


async def test_watch_sees_every_state_and_progress(h: Harness, ckpt: Path) -> None:
    sub = h.manager.bus.subscribe("m")
    events: list[tuple[EventType, ModelState]] = []

    async def collect() -> None:
        async for event in sub:
            events.append((event.type, event.model.state))

    collector = asyncio.create_task(collect())
    await h.manager.load("m", str(ckpt))
    await h.manager.sleep("m", 1)
    await h.manager.wake("m")
    await h.manager.unload("m")
    await asyncio.sleep(0)
    sub.close()
    await collector
    kinds = [e for e in events if e[0] is not EventType.PROGRESS]
    assert kinds[0] == (EventType.ADDED, ModelState.LOADING)
    states = [s for t, s in kinds if t is EventType.CHANGED]
    assert states == [
        ModelState.LOADING,
        ModelState.ACTIVE,
        ModelState.SLEEPING,
        ModelState.ASLEEP,
        ModelState.WAKING,
        ModelState.ACTIVE,
        ModelState.UNLOADING,
    ]
    assert kinds[-1][0] is EventType.REMOVED
    assert any(t is EventType.PROGRESS for t, _ in events)


async def test_close_frees_every_slab(tmp_path: Path, ckpt: Path) -> None:
    harness = Harness(tmp_path)
    await harness.manager.load("a", str(ckpt))
    await harness.manager.load("b", str(ckpt), target=Tier.HOST)
    await harness.manager.close(1.0)
    assert harness.device_used() == 0 and harness.backend.host_pool().used == 0
    harness.backend.close()


async def test_a_symlink_inside_the_source_cannot_leave_the_allowed_roots(
    h: Harness, tmp_path: Path
) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    target = make_checkpoint(outside / "secret.safetensors", layers=1)
    single = tmp_path / "single"
    single.mkdir()
    (single / "model.safetensors").symlink_to(target)
    with pytest.raises(PermissionDenied) as err:
        await h.manager.load("m", str(single))
    assert err.value.reason == "SOURCE_NOT_ALLOWED" and str(target) in err.value.message
    sharded = make_checkpoint(tmp_path / "sharded", layers=2, shards=2)
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    os.replace(shard, outside / shard.name)
    shard.symlink_to(outside / shard.name)
    with pytest.raises(PermissionDenied):
        await h.manager.load("m", str(sharded))
    assert h.manager.list_models() == [] and h.device_used() == 0


async def test_nul_in_a_source_is_invalid(h: Harness) -> None:
    with pytest.raises(InvalidArgument) as err:
        await h.manager.load("m", "/tmp/a\0b")
    assert err.value.reason == "INVALID_SOURCE_PATH"


async def test_retries_get_the_first_result_even_after_the_model_is_gone(
    h: Harness, ckpt: Path
) -> None:
    await h.manager.load("m", str(ckpt))
    first = await h.manager.unload("m", request_id="u1")
    again = await h.manager.unload("m", request_id="u1")
    assert again == first
    with pytest.raises(NotFound):
        await h.manager.unload("m", request_id="u2")


async def test_a_retry_during_validation_waits_for_the_load(h: Harness, ckpt: Path) -> None:
    first, second = await asyncio.gather(
        h.manager.load("m", str(ckpt), request_id="r"),
        h.manager.load("m", str(ckpt), request_id="r"),
    )
    assert first.state is ModelState.ACTIVE and second == first


async def test_load_of_a_loading_model_waits_for_it(h: Harness, ckpt: Path) -> None:
    started = await h.manager.load("m", str(ckpt), wait=False)
    assert started.state is ModelState.LOADING
    waited = await h.manager.load("m", str(ckpt), wait=True)
    assert waited.state is ModelState.ACTIVE
    unloading = await h.manager.unload("m", wait=False)
    assert unloading.state is ModelState.UNLOADING
    with pytest.raises(Aborted):
        await h.manager.load("m", str(ckpt))


class SlowDisk(SystemIO):
    """A disk that barely moves: each read takes `pause` seconds (and is
    counted in `reads`)."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self.reads = 0
        self.lock = threading.Lock()

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
        with self.lock:
            self.reads += 1
        time.sleep(self.pause)
        return super().preadv(fd, buffers, offset, flags)


async def test_shutdown_stops_a_transition_inside_a_big_layer(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    ckpt = make_checkpoint(tmp_path / "one.safetensors", layers=1, hidden=256)
    disk = SlowDisk(0.2)
    harness.manager.mover.read_options = ReadOptions(
        chunk_bytes=4096, threads=1, direct="off", io=disk
    )
    await harness.manager.load("m", str(ckpt), wait=False)
    task = harness.manager.registry.models["m"].task
    await asyncio.sleep(0.05)
    at_close = disk.reads
    await harness.manager.close(0.0)
    assert task is not None and task.done()
    assert isinstance(task.exception(), Aborted)
    chunks = len(plan_chunks(harness_checkpoint(ckpt), harness_plans(ckpt), 4096))
    # It stopped at the next chunk (one read may have been starting), not after the model.
    assert chunks > 50 and disk.reads <= at_close + 1
    assert harness.device_used() == 0 and harness.backend.host_pool().used == 0
    harness.backend.close()


def harness_checkpoint(path: Path):  # type: ignore[no-untyped-def]
    return open_checkpoint(path)


def harness_plans(path: Path):  # type: ignore[no-untyped-def]
    return plan_layers(open_checkpoint(path))


async def test_verified_wake_refuses_a_corrupt_host_copy(h: Harness, ckpt: Path) -> None:
    await h.manager.load("m", str(ckpt))
    await h.manager.sleep("m", 1)
    layer = h.manager.registry.models["m"].layers[3]
    assert layer.slab is not None
    with h.backend.view(layer.slab) as view:
        view[100] ^= 0x01  # one flipped bit in the pinned copy
    events = h.manager.bus.subscribe("m")
    with pytest.raises(DataLoss) as err:
        await h.manager.wake("m", verify=True)
    assert err.value.reason == "CHECKSUM_MISMATCH"
    assert err.value.metadata["layer"] == "layers.2"
    # The corrupt host copy is refused as the scrubber refuses one: the model
    # sleeps at level 2, its host copy freed, so no later call can serve it.
    m = h.manager.get("m")
    assert (m.state, m.sleep_level, m.state_reason) == (ModelState.ASLEEP, 2, "HOST_COPY_CORRUPT")
    assert "layers.2" in m.state_message and "source" in m.state_message
    assert set(tiers(m)) == {Tier.SOURCE}
    assert h.device_used() == 0  # nothing corrupt (or anything else) went to the device
    h.backend.drain()
    assert h.backend.host_pool().used == 0
    assert m.last_transition is not None
    assert m.last_transition.reason == "CHECKSUM_MISMATCH"
    assert [p.stage for p in m.last_transition.phases] == [Stage.TRANSFER, Stage.VERIFY]
    events.close()
    seen = [(e.model.state, e.model.state_reason) async for e in events]
    assert seen[-1] == (ModelState.ASLEEP, "HOST_COPY_CORRUPT")
    # A retry without verify reads (and checks) the source: never the bad copy.
    m = await h.manager.wake("m")
    assert m.state is ModelState.ACTIVE and m.state_reason == ""
    h.check_bytes("m")
    assert "refused" in err.value.message


async def test_offload_back_to_device_can_verify(h: Harness, ckpt: Path) -> None:
    await h.manager.load("m", str(ckpt))
    await h.manager.offload("m", ["layers.0", "post"], Tier.HOST)
    post = h.manager.registry.models["m"].layers[-1]
    assert post.slab is not None
    with h.backend.view(post.slab) as view:
        view[0] ^= 0xFF
    with pytest.raises(DataLoss) as err:
        await h.manager.offload("m", [], Tier.DEVICE, verify=True)
    assert err.value.reason == "CHECKSUM_MISMATCH"
    # Only the corrupt layer's host copy is refused; the other stays in host memory.
    m = h.manager.get("m")
    assert (m.state, m.state_reason) == (ModelState.OFFLOADED, "HOST_COPY_CORRUPT")
    assert "post" in m.state_message
    assert tiers(m)[1] is Tier.HOST and tiers(m)[-1] is Tier.SOURCE
    assert post.slab is None
    # Without verify now: the layer comes from the source, checked.
    m = await h.manager.offload("m", [], Tier.DEVICE)
    assert m.state is ModelState.ACTIVE
    h.check_bytes("m")


async def test_transitions_report_their_phases(h: Harness, ckpt: Path) -> None:
    m = await h.manager.load("m", str(ckpt))
    assert m.last_transition is not None
    read, verify = m.last_transition.phases  # read straight into the slabs: no transfer
    assert read.stage is Stage.READ and read.bytes == m.total_bytes and read.seconds > 0
    assert verify.stage is Stage.VERIFY and verify.bytes == m.total_bytes
    await h.manager.sleep("m", 1)
    m = await h.manager.wake("m", verify=True)
    assert m.last_transition is not None
    stages = [(p.stage, p.bytes) for p in m.last_transition.phases]
    assert stages == [(Stage.TRANSFER, m.total_bytes), (Stage.VERIFY, m.total_bytes)]


async def test_phases_are_wall_time_when_workers_overlap(h: Harness, ckpt: Path) -> None:
    """Four readers at once: a phase's duration is the time any of them was in
    it, which fits in the transition; their summed (busy) time need not."""
    # (a disk slow enough that the readers overlap)
    h.manager.mover.read_options = ReadOptions(
        chunk_bytes=65536, threads=4, direct="off", io=SlowDisk(0.02)
    )
    m = await h.manager.load("m", str(ckpt))
    t = m.last_transition
    assert t is not None and [p.stage for p in t.phases] == [Stage.READ, Stage.VERIFY]
    for phase in t.phases:
        assert 0 < phase.seconds <= t.duration
        assert phase.busy_seconds >= phase.seconds - 1e-9
    read = t.phases[0]
    assert read.busy_seconds > 1.5 * read.seconds  # the readers did overlap


async def test_freeing_transitions_move_nothing_and_say_what_they_freed(
    h: Harness, ckpt: Path
) -> None:
    m = await h.manager.load("m", str(ckpt))
    size = m.total_bytes
    assert m.last_transition is not None
    assert (m.last_transition.bytes, m.last_transition.freed) == (size, 0)
    m = await h.manager.sleep("m", 1)  # a move: device to host
    assert m.last_transition is not None
    assert (m.last_transition.bytes, m.last_transition.freed) == (size, 0)
    assert m.last_transition.bytes_per_second > 0
    await h.manager.wake("m")
    asleep = await h.manager.sleep("m", 2)
    await h.manager.wake("m")
    for m in (asleep, await h.manager.unload("m")):
        t = m.last_transition
        assert t is not None and t.outcome is Outcome.SUCCEEDED
        assert (t.bytes, t.freed, t.bytes_per_second) == (0, size, 0.0)
    assert m.state is ModelState.UNLOADED  # what the caller of unload is told
    with pytest.raises(NotFound):
        h.manager.get("m")


async def test_a_read_error_fails_the_load_and_frees_everything(h: Harness, ckpt: Path) -> None:
    class FailsLater(SlowDisk):
        def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
            with self.lock:
                self.reads += 1
                if self.reads > 30:
                    raise OSError(errno.EIO, "Input/output error")
            return SystemIO.preadv(self, fd, buffers, offset, flags)

    h.manager.mover.read_options = ReadOptions(
        chunk_bytes=4096, threads=2, direct="off", io=FailsLater(0)
    )
    with pytest.raises(Unavailable) as err:
        await h.manager.load("m", str(ckpt))
    assert err.value.reason == "SOURCE_READ_FAILED"
    m = h.manager.get("m")
    assert (m.state, m.state_reason) == (ModelState.FAILED, "SOURCE_READ_FAILED")
    assert {layer.tier for layer in m.layers} == {Tier.SOURCE}  # no half-filled slab reachable
    assert h.device_used() == 0 and h.backend.host_pool().used == 0


class RefusesOneDeviceFree(HostBackend):
    """A driver that, once `refused` is a list, refuses to free the first
    device slab it is asked to (and notes its size there)."""

    refused: list[int] | None = None

    def free(self, slab: Slab) -> None:
        if self.refused == [] and slab.tier is Tier.DEVICE:
            self.refused.append(slab.size)
            raise RuntimeError("cuMemRelease failed: CUDA_ERROR_LAUNCH_FAILED")
        super().free(slab)


async def test_a_free_that_fails_after_a_move_keeps_the_model_in_its_new_slabs(
    tmp_path: Path, ckpt: Path
) -> None:
    """A driver that refuses to free the old slabs of a finished move (a GPU
    after a sticky error, say): the move stands, the layers keep their new
    slabs, and what could not be freed stays accounted rather than referenced."""
    h = Harness(tmp_path, backend=RefusesOneDeviceFree)
    try:
        await moved_with_one_free_refused(h, ckpt)
    finally:
        await h.close()


async def moved_with_one_free_refused(h: Harness, ckpt: Path) -> None:
    await h.manager.load("m", str(ckpt))
    assert isinstance(h.backend, RefusesOneDeviceFree)
    refused: list[int] = []
    h.backend.refused = refused
    asleep = await h.manager.sleep("m", 1)
    assert asleep.state is ModelState.ASLEEP and set(tiers(asleep)) == {Tier.HOST}
    # One old slab stayed: still accounted, referenced by no layer.
    assert len(refused) == 1 and h.device_used() == refused[0]
    model = h.manager.registry.models["m"]
    assert all(layer.slab is not None and not layer.slab.freed for layer in model.layers)
    h.check_bytes("m")
    awake = await h.manager.wake("m")  # and it wakes as ever
    assert awake.state is ModelState.ACTIVE
    h.check_bytes("m")


async def test_a_forced_unload_cancels_a_slow_load_and_frees_everything(
    h: Harness, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "slow.safetensors", layers=1, hidden=256)
    disk = SlowDisk(0.2)
    h.manager.mover.read_options = ReadOptions(chunk_bytes=4096, threads=1, direct="off", io=disk)
    await h.manager.load("m", str(ckpt), wait=False)
    await asyncio.sleep(0.05)
    with pytest.raises(Aborted) as err:  # without force: refused, as ever
        await h.manager.unload("m")
    assert err.value.reason == "TRANSITION_IN_PROGRESS"
    at_unload = disk.reads
    gone = await h.manager.unload("m", force=True)
    assert gone.model_id == "m" and "m" not in h.manager.registry.models
    # The reader stopped at its next chunk (one read may have been starting), not after the model.
    assert disk.reads <= at_unload + 1
    assert h.device_used() == 0 and h.backend.host_pool().used == 0
    # And the same id loads again.
    disk.pause = 0  # (the disk is fast again)
    assert (await h.manager.load("m", str(ckpt))).state is ModelState.ACTIVE


async def test_level1_sleep_of_a_level2_sleeper_reads_its_weights_into_host(
    h: Harness, tmp_path: Path
) -> None:
    path = make_checkpoint(tmp_path / "one.safetensors", layers=2)
    await h.manager.load("m", str(path))
    size = h.device_used()
    await h.manager.sleep("m", 2)
    assert h.backend.host_pool().used == 0
    m = await h.manager.sleep("m", 1)
    assert (m.state, m.sleep_level) == (ModelState.ASLEEP, 1)
    assert set(tiers(m)) == {Tier.HOST}
    assert h.device_used() == 0 and h.backend.host_pool().used == size
    m = await h.manager.wake("m")
    assert m.state is ModelState.ACTIVE and set(tiers(m)) == {Tier.DEVICE}
    h.check_bytes("m")


async def test_level1_sleep_of_a_level2_sleeper_refuses_a_changed_source(
    h: Harness, tmp_path: Path
) -> None:
    path = make_checkpoint(tmp_path / "one.safetensors", layers=2)
    await h.manager.load("m", str(path))
    await h.manager.sleep("m", 2)
    with open(path, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(FailedPrecondition) as err:
        await h.manager.sleep("m", 1)
    assert err.value.reason == "SOURCE_CHANGED"
    m = h.manager.get("m")
    assert (m.state, m.sleep_level) == (ModelState.ASLEEP, 2)
    assert h.device_used() == 0 and h.backend.host_pool().used == 0
