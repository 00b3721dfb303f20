"""The DISK tier through the manager: offload, sleep with a disk copy, corruption, restarts."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from torpor.testing import make_checkpoint
from torpord.errors import FailedPrecondition, ResourceExhausted
from torpord.storage.diskcache import DiskCache, DiskEntry
from torpord.storage.fileio import Buffer, SystemIO
from torpord.storage.pipeline import ReadOptions
from torpord.storage.safetensors import SourceFile
from torpord.types import ModelState, Tier

from tests.smallfs import small_filesystem

from .harness import Harness, disk_harness, expected_slab, tiers


def cache_files(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_ino) for p in root.glob("*/*"))


def touch_source(ckpt: Path) -> None:
    for shard in ckpt.glob("*.safetensors"):
        st = shard.stat()
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1))


def disk_entries(h: Harness, model_id: str) -> list[DiskEntry]:
    return [
        layer.disk for layer in h.manager.registry.models[model_id].layers if layer.disk is not None
    ]


async def test_offload_to_disk_and_back(tmp_path: Path, ckpt: Path) -> None:
    h = disk_harness(tmp_path)
    try:
        m = await h.manager.load("m", str(ckpt))
        m = await h.manager.offload("m", ["layers.1", "post"], Tier.DISK)
        assert m.state is ModelState.OFFLOADED
        assert [layer.plan.name for layer in m.layers if layer.tier is Tier.DISK] == [
            "layers.1",
            "post",
        ]
        on_disk = m.bytes_in(Tier.DISK)
        assert h.device_used() == m.total_bytes - on_disk
        assert h.manager.disk is not None and h.manager.disk.used >= on_disk
        h.check_bytes("m")
        m = await h.manager.offload("m", [], Tier.DEVICE)
        assert m.state is ModelState.ACTIVE
        h.check_bytes("m")
        # Asleep at level 1, the disk layers stay on disk; wake brings all back.
        await h.manager.offload("m", ["pre"], Tier.DISK)
        m = await h.manager.sleep("m", 1)
        assert m.layers[0].tier is Tier.DISK and m.layers[1].tier is Tier.HOST
        m = await h.manager.wake("m", verify=True)
        assert m.state is ModelState.ACTIVE
        h.check_bytes("m")
    finally:
        await h.close()


async def test_sleep_level_2_with_a_disk_copy_wakes_without_the_source(
    tmp_path: Path,
) -> None:
    h = disk_harness(tmp_path)
    try:
        path = make_checkpoint(tmp_path / "gone" / "m.safetensors", layers=3)
        await h.manager.load("m", str(path))
        expected = {
            layer.plan.name: expected_slab(layer.plan, [str(path)])
            for layer in h.manager.registry.models["m"].layers
        }
        m = await h.manager.sleep("m", 2, disk_copy=True)
        assert {layer.tier for layer in m.layers} == {Tier.DISK}
        assert h.device_used() == 0 and h.backend.host_pool().used == 0
        path.unlink()  # the source is gone
        m = await h.manager.wake("m")
        assert m.state is ModelState.ACTIVE
        for layer in h.manager.registry.models["m"].layers:
            assert layer.slab is not None
            with h.backend.view(layer.slab) as view:
                assert bytes(view) == expected[layer.plan.name]
    finally:
        await h.close()


async def test_a_full_disk_leaves_the_layers_where_they_were(tmp_path: Path, ckpt: Path) -> None:
    h = disk_harness(tmp_path, capacity=8192)
    try:
        await h.manager.load("m", str(ckpt))
        with pytest.raises(ResourceExhausted) as err:
            await h.manager.offload("m", [], Tier.DISK)
        assert err.value.reason == "DISK_FULL"
        m = h.manager.get("m")
        assert m.state is ModelState.ACTIVE and {layer.tier for layer in m.layers} == {Tier.DEVICE}
        assert h.manager.disk is not None and h.manager.disk.used == 0
    finally:
        await h.close()


async def test_disk_tier_needs_a_cache(h: Harness, ckpt: Path) -> None:
    await h.manager.load("m", str(ckpt))
    with pytest.raises(FailedPrecondition) as err:
        await h.manager.offload("m", [], Tier.DISK)
    assert err.value.reason == "DISK_CACHE_DISABLED"


async def test_a_corrupt_disk_copy_is_never_served(tmp_path: Path, ckpt: Path) -> None:
    h = disk_harness(tmp_path)
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.offload("m", ["layers.2"], Tier.DISK)
        entry = h.manager.registry.models["m"].layers[3].disk
        assert entry is not None
        with open(entry.path, "r+b") as f:
            f.seek(-10, os.SEEK_END)
            f.write(b"corruption")
        # The bad copy is dropped and the layer read from the (unchanged) source.
        m = await h.manager.wake("m")
        assert m.state is ModelState.ACTIVE
        assert m.last_transition is not None and "layers.2" in m.last_transition.note
        h.check_bytes("m")
        assert not entry.path.exists() and h.manager.disk is not None
        assert h.manager.disk.get(entry.key) is None and h.manager.disk.used == 0
    finally:
        await h.close()


@pytest.mark.parametrize("how", ["wake", "offload"])
async def test_a_disk_copy_deleted_behind_the_daemon_falls_back_to_the_source(
    tmp_path: Path, ckpt: Path, how: str
) -> None:
    h = disk_harness(tmp_path)
    try:
        await h.manager.load("m", str(ckpt))
        if how == "wake":
            await h.manager.sleep("m", 2, disk_copy=True)
        else:
            await h.manager.offload("m", ["layers.0", "layers.4"], Tier.DISK)
        lost = h.manager.registry.models["m"].layers[1].disk
        assert lost is not None
        lost.path.unlink()
        if how == "wake":
            m = await h.manager.wake("m", verify=True)
        else:
            m = await h.manager.offload("m", [], Tier.DEVICE, verify=True)
        assert m.state is ModelState.ACTIVE and set(tiers(m)) == {Tier.DEVICE}
        h.check_bytes("m")
        assert h.manager.disk is not None and h.manager.disk.get(lost.key) is None
        assert h.manager.registry.models["m"].layers[1].disk is None
    finally:
        await h.close()


async def test_a_lost_disk_copy_and_a_changed_source_is_source_changed(
    tmp_path: Path, ckpt: Path
) -> None:
    h = disk_harness(tmp_path)
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.sleep("m", 2, disk_copy=True)
        lost = h.manager.registry.models["m"].layers[1].disk
        assert lost is not None
        lost.path.unlink()
        touch_source(ckpt)  # no longer the one loaded
        with pytest.raises(FailedPrecondition) as err:
            await h.manager.wake("m")
        assert err.value.reason == "SOURCE_CHANGED"
        assert "layers.0" in err.value.message and "was lost" in err.value.message
        m = h.manager.get("m")
        assert m.state is ModelState.ASLEEP and m.state_reason == "SOURCE_CHANGED"
        assert m.layers[1].tier is Tier.SOURCE
        assert {layer.tier for layer in m.layers[2:]} == {Tier.DISK}
        assert h.device_used() == 0
    finally:
        await h.close()


async def test_a_disk_copy_with_other_bytes_and_a_changed_source_names_both_checksums(
    tmp_path: Path, ckpt: Path
) -> None:
    # The cache holds, under the layer's key, a newer entry whose checksum is
    # not the one the model knows for that layer (so not the bytes it had):
    # refused and removed as CACHE_CORRUPT, and with the source changed too,
    # the error names both checksums.
    h = disk_harness(tmp_path)
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.sleep("m", 2, disk_copy=True)
        layer = h.manager.registry.models["m"].layers[1]
        entry, disk = layer.disk, h.manager.disk
        assert entry is not None and disk is not None
        other = "0" * len(entry.checksum)
        assert other != entry.checksum
        room = disk.reserve([entry.size], set())
        newer = disk.write(entry.key, memoryview(bytes(entry.size)), other, room)
        disk.release(room)
        touch_source(ckpt)  # no longer the one loaded
        with pytest.raises(FailedPrecondition) as err:
            await h.manager.wake("m")
        assert err.value.reason == "SOURCE_CHANGED"
        assert f"(checksum {other}, expected {entry.checksum})" in err.value.message
        assert "layers.0" in err.value.message
        assert disk.get(entry.key) is None and not newer.path.exists()
        assert h.manager.get("m").state is ModelState.ASLEEP and h.device_used() == 0
    finally:
        await h.close()


class RunsOutOfFds(SystemIO):
    """The cache's reads, failing with EMFILE while `out` is set."""

    out = False

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
        if self.out:
            raise OSError(errno.EMFILE, "Too many open files")
        return super().preadv(fd, buffers, offset, flags)


async def test_a_disk_copy_that_cant_be_read_right_now_is_kept(tmp_path: Path, ckpt: Path) -> None:
    io = RunsOutOfFds()
    h = disk_harness(tmp_path, io=io)
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.sleep("m", 2, disk_copy=True)
        used = h.manager.disk.used if h.manager.disk else 0
        io.out = True
        m = await h.manager.wake("m")  # from the source, unchanged
        io.out = False
        assert m.state is ModelState.ACTIVE
        h.check_bytes("m")
        assert h.manager.disk is not None and h.manager.disk.used == used
        assert all(layer.disk is not None for layer in h.manager.registry.models["m"].layers)
    finally:
        await h.close()


async def test_a_load_over_a_corrupt_copy_from_a_previous_run_reads_the_source(
    tmp_path: Path, ckpt: Path
) -> None:
    first = disk_harness(tmp_path)
    await first.manager.load("m", str(ckpt))
    await first.manager.offload("m", [], Tier.DISK)
    entry = first.manager.registry.models["m"].layers[2].disk
    await first.close()
    assert entry is not None
    with open(entry.path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"!")
    second = disk_harness(tmp_path)
    try:
        m = await second.manager.load("m", str(ckpt))
        assert m.state is ModelState.ACTIVE
        second.check_bytes("m")
        assert not entry.path.exists()
    finally:
        await second.close()


class NoSourceReads(SystemIO):
    def open(self, src: SourceFile, direct: bool) -> int:
        raise AssertionError(f"opened {src.path} to read although every layer is cached")


async def test_after_a_restart_a_load_reads_the_cached_layers(tmp_path: Path, ckpt: Path) -> None:
    first = disk_harness(tmp_path)
    await first.manager.load("m", str(ckpt))
    await first.manager.offload("m", [], Tier.DISK)
    await first.close()
    second = disk_harness(tmp_path)  # a new daemon, the same cache directory
    try:
        second.manager.mover.read_options = ReadOptions(io=NoSourceReads())
        m = await second.manager.load("m", str(ckpt))
        assert m.state is ModelState.ACTIVE
        second.check_bytes("m")
    finally:
        await second.close()


async def test_models_sharing_a_source_share_its_disk_copies(tmp_path: Path, ckpt: Path) -> None:
    h = disk_harness(tmp_path, capacity=600 * 1024)  # room for one copy of the model
    try:
        await h.manager.load("a", str(ckpt))
        await h.manager.load("b", str(ckpt))
        await h.manager.offload("a", [], Tier.DISK)
        m = await h.manager.offload("b", [], Tier.DISK)  # reuses a's copies: no DISK_FULL
        assert {layer.tier for layer in m.layers} == {Tier.DISK}
        h.check_bytes("b")
    finally:
        await h.close()


async def test_offload_to_disk_skips_layers_left_at_the_source(tmp_path: Path, ckpt: Path) -> None:
    h = disk_harness(tmp_path)
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.offload("m", ["layers.0"], Tier.DISK)
        layer = h.manager.registry.models["m"].layers[1]
        assert layer.disk is not None
        with open(layer.disk.path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            f.write(b"!")
        touch_source(ckpt)  # nothing to fall back to
        with pytest.raises(FailedPrecondition):
            await h.manager.wake("m")
        assert h.manager.get("m").layers[1].tier is Tier.SOURCE
        m = await h.manager.offload("m", [], Tier.DISK)  # no INTERNAL for the source layer
        assert m.layers[1].tier is Tier.SOURCE
        assert {layer.tier for layer in m.layers[2:]} == {Tier.DISK}
    finally:
        await h.close()


async def test_a_full_filesystem_evicts_unused_copies_and_failed_tries_leave_the_cache_as_it_was(
    tmp_path: Path,
) -> None:
    """The budget allows it, the filesystem (a real tmpfs) does not: copies no
    model uses are evicted and the write tried again; where that is not
    enough, the offload is DISK_FULL and leaves no file and no byte behind."""
    a = make_checkpoint(tmp_path / "a", layers=6, hidden=64, seed=1)
    b = make_checkpoint(tmp_path / "b", layers=6, hidden=64, seed=2)
    with small_filesystem(tmp_path / "fs", 1024 * 1024) as fs:  # one model's copy, not two
        h = Harness(tmp_path)
        disk = h.manager.disk = h.manager.mover.disk = DiskCache(fs / "cache", 1 << 30)
        try:
            await h.manager.load("a", str(a))
            await h.manager.load("b", str(b))
            await h.manager.offload("a", [], Tier.DISK)
            before = (cache_files(fs / "cache"), disk.used)
            for _ in range(3):
                with pytest.raises(ResourceExhausted) as err:
                    await h.manager.offload("b", [], Tier.DISK)
                assert err.value.reason == "DISK_FULL" and "filesystem is full" in err.value.message
                assert (cache_files(fs / "cache"), disk.used) == before
                m = h.manager.get("b")
                assert m.state is ModelState.ACTIVE and set(tiers(m)) == {Tier.DEVICE}
                assert all(layer.disk is None for layer in h.manager.registry.models["b"].layers)
            h.check_bytes("b")
            await h.manager.unload("a")  # a's copies: no model uses them now
            m = await h.manager.offload("b", [], Tier.DISK)
            assert set(tiers(m)) == {Tier.DISK}
            h.check_bytes("b")  # (its copies hold exactly its bytes)
            # Some of a's copies made room; what is left is all counted.
            left = list((fs / "cache").glob("*/*.slab"))
            assert disk.used == sum(p.stat().st_size for p in left)
            assert {e.path for e in disk_entries(h, "b")} <= set(left)
            m = await h.manager.offload("b", [], Tier.DEVICE, verify=True)
            h.check_bytes("b")
        finally:
            await h.close()


async def test_a_forced_unload_racing_writes_to_disk_leaves_the_cache_consistent(
    tmp_path: Path, ckpt: Path
) -> None:
    """Wherever a forced Unload lands in an offload to disk (or a level-2
    sleep with a disk copy), the cache holds exactly the files it counts: no
    reservation left charged, no temporary file, no entry without its file."""
    h = disk_harness(tmp_path)
    disk = h.manager.disk
    assert disk is not None
    rng = random.Random(11)
    try:
        for _ in range(60):
            await h.manager.load("m", str(ckpt))
            if rng.random() < 0.5:
                await h.manager.offload("m", [], Tier.DISK, wait=False)
            else:
                await h.manager.sleep("m", 2, disk_copy=True, wait=False)
            for _ in range(rng.randint(0, 12)):
                await asyncio.sleep(0)
            if rng.random() < 0.3:
                await asyncio.sleep(rng.random() * 0.005)
            await h.manager.unload("m", force=True)
            files = list((tmp_path / "cache").glob("*/*"))
            assert all(p.suffix == ".slab" for p in files)  # (no temporary file)
            on_disk = {p.stem: p.stat().st_size for p in files}
            assert disk.used == sum(on_disk.values())
            assert all(disk.get(key) is not None for key in on_disk)
            if rng.random() < 0.8:  # mostly from nothing: every layer written anew
                for key in list(on_disk):
                    entry = disk.get(key)
                    assert entry is not None
                    disk.remove(entry)
        assert h.device_used() == 0 and h.backend.host_pool().used == 0
    finally:
        await h.close()
