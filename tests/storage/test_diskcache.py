"""The disk cache: atomic entries, budgets, restarts, corruption and loss refused."""

from __future__ import annotations

import errno
import gc
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest
from torpor.testing import make_checkpoint
from torpord.errors import DataLoss, ResourceExhausted, Unavailable
from torpord.storage import diskcache
from torpord.storage.checkpoint import open_checkpoint
from torpord.storage.checksum import slab_checksum
from torpord.storage.diskcache import (
    DATA_OFFSET,
    MAGIC,
    DiskCache,
    FilesystemFull,
    cache_key,
)
from torpord.storage.fileio import Buffer, SystemIO
from torpord.storage.layers import plan_layers

from tests.smallfs import small_filesystem

from .helpers import put
from .sinks import Sink


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*"))


@pytest.mark.parametrize("addressable", [True, False])
def test_round_trip_and_restart(tmp_path: Path, addressable: bool) -> None:
    cache = DiskCache(tmp_path / "c", 1 << 20)
    payload = os.urandom(10_000)
    entry = put(cache, "ab" * 16, payload)
    assert cache.used == DATA_OFFSET + len(payload) == entry.file_bytes
    sink = Sink(len(payload), addressable)
    cache.read_into(entry, sink, "layers.0")
    assert bytes(sink.data) == payload
    again = DiskCache(tmp_path / "c", 1 << 20)  # the daemon restarted
    assert again.get("ab" * 16) == entry and again.used == cache.used


def test_half_written_and_junk_entries_are_dropped_at_start(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 20)
    good = put(cache, "cd" * 16, b"x" * 100)
    (tmp_path / "cd" / f"{'cd' * 16}.1.2.tmp").write_bytes(b"half")
    (tmp_path / "cd" / f"{'cd' * 16}.123.0a1b2c3d.tmp").write_bytes(b"half")
    (tmp_path / "cd" / f"{'ef' * 16}.slab").write_bytes(b"not a slab")
    again = DiskCache(tmp_path, 1 << 20)
    assert again.get("cd" * 16) == good and again.get("ef" * 16) is None
    assert sorted(p.name for p in (tmp_path / "cd").iterdir()) == [good.path.name]


def test_an_entry_checksummed_by_another_definition_is_dropped_at_start(
    tmp_path: Path,
) -> None:
    cache = DiskCache(tmp_path, 1 << 20)
    entry = put(cache, "34" * 16, os.urandom(3000))
    with open(entry.path, "r+b") as f:  # as an older torpord wrote it
        head = f.read(DATA_OFFSET)
        (n,) = struct.unpack_from("<I", head, len(MAGIC))
        meta = json.loads(head[len(MAGIC) + 4 : len(MAGIC) + 4 + n])
        assert meta.pop("checksum_kind") == "xxh3-64/1MiB-chunks"
        body = json.dumps(meta).encode()
        f.seek(0)
        f.write(MAGIC + struct.pack("<I", len(body)) + body)
    again = DiskCache(tmp_path, 1 << 20)
    assert again.get(entry.key) is None and not entry.path.exists()
    assert again.used == 0


def test_a_corrupt_entry_is_refused_and_removed(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 20)
    entry = put(cache, "12" * 16, os.urandom(5000))
    with open(entry.path, "r+b") as f:
        f.seek(DATA_OFFSET + 1234)
        f.write(b"\0\1\2")
    with pytest.raises(DataLoss) as err:
        cache.read_into(entry, Sink(5000), "layers.3")
    assert err.value.reason == "CACHE_CORRUPT" and "layers.3" in err.value.message
    assert cache.get(entry.key) is None and not entry.path.exists()


def test_an_entry_deleted_behind_the_cache_is_dropped(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 20)
    entry = put(cache, "13" * 16, os.urandom(5000))
    entry.path.unlink()
    with pytest.raises(DataLoss) as err:
        cache.read_into(entry, Sink(5000), "layers.3")
    assert err.value.reason == "CACHE_ENTRY_LOST" and "layers.3" in err.value.message
    assert cache.get(entry.key) is None and cache.used == 0


@pytest.mark.parametrize("planted", ["symlink", "fifo", "directory"])
def test_what_is_planted_where_an_entry_was_is_refused_unfollowed(
    tmp_path: Path, planted: str
) -> None:
    """A symbolic link is never followed (its target is not read, nor
    removed), a FIFO never blocks a read; neither is deleted (not ours)."""
    cache = DiskCache(tmp_path / "c", 1 << 20)
    payload = os.urandom(5000)
    entry = put(cache, "14" * 16, payload)
    outside = tmp_path / "outside"
    outside.write_bytes(entry.path.read_bytes())  # a valid entry's bytes, even
    entry.path.unlink()
    if planted == "symlink":
        entry.path.symlink_to(outside)
    elif planted == "fifo":
        os.mkfifo(entry.path)
    else:
        entry.path.mkdir()
    with pytest.raises(DataLoss) as err:
        cache.read_into(entry, Sink(5000), "layers.0")
    assert err.value.reason in ("CACHE_CORRUPT", "CACHE_ENTRY_LOST")
    assert cache.get(entry.key) is None and cache.used == 0
    assert os.path.lexists(entry.path)  # left where it is
    assert outside.read_bytes()[DATA_OFFSET:] == payload


def test_budget_evicts_unused_copies_and_never_protected_ones(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 3 * (DATA_OFFSET + 1000))
    a = put(cache, "a" * 32, b"a" * 1000)
    b = put(cache, "b" * 32, b"b" * 1000)
    with pytest.raises(ResourceExhausted) as err:
        cache.reserve([1000, 1000], {a.key, b.key})
    assert err.value.reason == "DISK_FULL"
    assert {"asked", "free", "budget"} <= set(err.value.metadata)
    assert cache.get(a.key) and cache.get(b.key)  # nothing was evicted for a failed reserve
    with pytest.raises(ResourceExhausted):
        cache.check_room([1000, 1000], {a.key, b.key})
    cache.check_room([1000, 1000], {b.key})  # a could go...
    assert cache.get(a.key) is not None  # ...but a check takes nothing
    room = cache.reserve([1000, 1000], {b.key})  # a may go
    assert cache.get(a.key) is None and cache.get(b.key) is not None
    cache.release(room)
    cache.release(room)  # (twice is harmless)
    assert cache.used == b.file_bytes


def test_entries_written_under_a_live_reservation_are_not_evicted(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 2 * (DATA_OFFSET + 1000))
    room = cache.reserve([1000], set())
    a = cache.write("a" * 32, memoryview(b"a" * 1000), slab_checksum(b"a" * 1000), room)
    with pytest.raises(ResourceExhausted):  # a is nobody's yet, but its transition runs
        cache.reserve([1000, 1000], set())
    assert cache.make_room(1 << 30, set()) == 0
    cache.release(room)
    cache.reserve([1000, 1000], set())
    assert cache.get(a.key) is None


def test_undoing_a_reservation_removes_its_entries_but_those_others_hold(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 20)
    data = b"x" * 1000
    mine, theirs = cache.reserve([1000] * 3, set()), cache.reserve([1000], set())
    a = cache.write("a" * 32, memoryview(data), slab_checksum(data), mine)
    b = cache.write("b" * 32, memoryview(data), slab_checksum(data), mine)
    cache.write("c" * 32, memoryview(data), slab_checksum(data), mine)
    c = cache.write("c" * 32, memoryview(data), slab_checksum(data), theirs)  # the same key
    cache.undo(mine, protect={b.key})  # b: a model took it meanwhile
    assert cache.get(a.key) is None and not a.path.exists()
    assert cache.get(b.key) == b and cache.get(c.key) == c and c.path.exists()
    assert cache.used == b.file_bytes + c.file_bytes
    cache.release(theirs)
    assert cache.used == b.file_bytes + c.file_bytes


def test_a_full_filesystem_is_disk_full_leaves_nothing_and_evicts_unused_copies(
    tmp_path: Path,
) -> None:
    with small_filesystem(tmp_path / "fs", 256 * 1024) as fs:
        cache = DiskCache(fs / "cache", 1 << 30)  # the budget would allow it; the filesystem not
        used = put(cache, "a" * 32, os.urandom(100_000))
        unused = put(cache, "b" * 32, os.urandom(100_000))
        before = files(fs / "cache")
        room = cache.reserve([100_000], set())
        payload = os.urandom(100_000)
        with pytest.raises(FilesystemFull) as err:
            cache.write("c" * 32, memoryview(payload), slab_checksum(payload), room)
        assert err.value.reason == "DISK_FULL"
        assert files(fs / "cache") == before  # no entry, no temporary file
        assert cache.used == used.file_bytes + unused.file_bytes + room.left
        assert cache.make_room(DATA_OFFSET + 100_000, {used.key}) > 0
        assert cache.get(unused.key) is None and cache.get(used.key) == used
        entry = cache.write("c" * 32, memoryview(payload), slab_checksum(payload), room)
        cache.release(room)
        sink = Sink(len(payload))
        cache.read_into(entry, sink, "layers.0")
        assert bytes(sink.data) == payload
        assert cache.used == used.file_bytes + entry.file_bytes


class OutOfFds(SystemIO):
    """A system out of file descriptors (for now): every read fails."""

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
        raise OSError(errno.EMFILE, "Too many open files")


def test_a_read_that_fails_is_unavailable_and_keeps_the_entry(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 20, io=OutOfFds())
    entry = put(cache, "77" * 16, os.urandom(1000))
    with pytest.raises(Unavailable) as err:
        cache.read_into(entry, Sink(1000), "layers.0")
    assert err.value.reason == "DISK_READ_FAILED"
    assert cache.get(entry.key) == entry and entry.path.exists()


def test_removing_a_replaced_entry_keeps_the_new_file(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 20)
    old = put(cache, "55" * 16, b"a" * 100)
    new = put(cache, "55" * 16, b"b" * 100)  # the same key written again, same path
    cache.remove(old)
    assert cache.get(new.key) == new and new.path.exists()
    cache.remove(new)
    assert cache.get(new.key) is None and not new.path.exists()


def test_a_changed_source_gets_a_different_key(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m.safetensors", layers=1)
    ckpt = open_checkpoint(path)
    plan = plan_layers(ckpt)[1]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert cache_key(ckpt, plan) != cache_key(open_checkpoint(path), plan)


def test_an_entry_written_from_pieces(tmp_path: Path) -> None:
    """A device slab reaches the cache as pieces through host staging: each
    piece valid only until the next (here one buffer, overwritten)."""
    cache = DiskCache(tmp_path / "c", 1 << 20)
    payload = os.urandom(50_000)
    staging = bytearray(4096)

    def pieces():  # type: ignore[no-untyped-def]
        for at in range(0, len(payload), len(staging)):
            n = min(len(staging), len(payload) - at)
            staging[:n] = payload[at : at + n]
            with memoryview(staging)[:n] as piece:
                yield piece

    room = cache.reserve([len(payload)], set())
    entry = cache.write("cd" * 16, pieces(), slab_checksum(payload), room, len(payload))
    cache.release(room)
    sink = Sink(len(payload))
    cache.read_into(entry, sink, "layers.0")
    assert bytes(sink.data) == payload and entry.size == len(payload)


@pytest.mark.parametrize("failure", ["short", "source"])
def test_pieces_that_fall_short_or_fail_leave_nothing(tmp_path: Path, failure: str) -> None:
    cache = DiskCache(tmp_path, 1 << 20)

    def pieces():  # type: ignore[no-untyped-def]
        yield memoryview(b"a" * 100)
        if failure == "source":
            raise RuntimeError("the device copy failed")

    room = cache.reserve([200], set())
    with pytest.raises(RuntimeError, match=r"100 bytes written, 200 expected|device copy"):
        cache.write("ef" * 16, pieces(), "0" * 16, room, 200)
    assert files(tmp_path) == []  # no entry, no temporary file
    assert cache.get("ef" * 16) is None and cache.used == room.left == DATA_OFFSET + 200
    cache.release(room)
    assert cache.used == 0


def test_a_write_never_goes_through_a_symlinked_folder(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", 1 << 20)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "c" / "ab").symlink_to(elsewhere)
    room = cache.reserve([100], set())
    with pytest.raises(Unavailable) as err:
        cache.write("ab" * 16, memoryview(b"x" * 100), "0" * 16, room)
    assert err.value.reason == "DISK_WRITE_FAILED"
    assert list(elsewhere.iterdir()) == [] and cache.get("ab" * 16) is None
    cache.release(room)


def test_a_plans_cache_key_is_remembered_and_dropped_with_the_plan(tmp_path: Path) -> None:
    ckpt = open_checkpoint(make_checkpoint(tmp_path / "m", layers=2))
    plans = plan_layers(ckpt)
    keys = [cache_key(ckpt, plan) for plan in plans]
    assert [diskcache._cache_key(ckpt, plan) for plan in plans] == keys
    assert all(id(plan) in diskcache._KEYS for plan in plans)
    # Another checkpoint with the same plan object (never in practice) gets its own.
    other = open_checkpoint(make_checkpoint(tmp_path / "n", layers=2))
    assert cache_key(other, plans[0]) == diskcache._cache_key(other, plans[0]) != keys[0]
    ids = [id(plan) for plan in plans]
    del plans
    gc.collect()
    assert not any(i in diskcache._KEYS for i in ids)
