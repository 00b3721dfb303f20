"""The disk cache's directory as others may have left it: junk skipped at start
(removed only where it is a regular file of ours), an unsafe directory refused."""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from torpord.storage.cachefiles import CacheDir, UnsafeCacheDir
from torpord.storage.cacheformat import encode_head
from torpord.storage.checksum import KIND, slab_checksum
from torpord.storage.diskcache import DATA_OFFSET, MAGIC, DiskCache, DiskEntry

from .helpers import put
from .sinks import Sink

KEY = "5a" * 16
OTHER = "5a" + "0f" * 15
PAYLOAD = bytes(range(256)) * 8


def raw_entry(meta: bytes, body: bytes = PAYLOAD, length: int | None = None) -> bytes:
    n = len(meta) if length is None else length
    head = MAGIC + struct.pack("<I", n) + meta
    return head + bytes(DATA_OFFSET - len(head)) + body


def meta(**changes: object) -> bytes:
    fields: dict[str, object] = {
        "key": OTHER,
        "size": len(PAYLOAD),
        "checksum": slab_checksum(PAYLOAD),
        "checksum_kind": KIND,
    }
    fields.update(changes)
    return json.dumps({k: v for k, v in fields.items() if v is not ...}).encode()


def mknod_null(path: Path) -> None:
    """A device node like /dev/null: opening one may have effects, so it never is."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))


def regular(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


# What may lie at <root>/5a/<OTHER>.slab (a name of ours, in our layout): a
# regular file that is not a valid entry is removed; anything else is left.
AT_AN_ENTRY_NAME: dict[str, tuple[Callable[[Path], None], bool]] = {
    "meta a JSON list": (regular(raw_entry(b"[1, 2]")), True),
    "size null": (regular(raw_entry(meta(size=None))), True),
    "size a bool": (regular(raw_entry(meta(size=True))), True),
    "size negative": (regular(raw_entry(meta(size=-4096))), True),
    "size a float": (regular(raw_entry(meta(size=2048.0))), True),
    "size past the file": (regular(raw_entry(meta(size=len(PAYLOAD) + 1))), True),
    "nested 2000 deep": (regular(raw_entry(b"[" * 2000 + b"]" * 2000)), True),
    "meta length past the header": (regular(raw_entry(meta(), length=2**31)), True),
    "meta not UTF-8": (regular(raw_entry(b'{"key": "\xff"}')), True),
    "meta with a key twice": (regular(raw_entry(b'{"key": 1, "key": 2}')), True),
    "key of another file": (regular(raw_entry(meta(key=KEY))), True),
    "key not a string": (regular(raw_entry(meta(key=7))), True),
    "checksum not hex": (regular(raw_entry(meta(checksum="../../etc/passwd"))), True),
    "checksum kind missing": (regular(raw_entry(meta(checksum_kind=...))), True),
    "an extra field": (regular(raw_entry(meta(extra=1))), True),
    "no magic": (regular(b"not a slab at all"), True),
    "empty": (regular(b""), True),
    "a directory": (lambda path: path.mkdir(), False),
    "a FIFO": (lambda path: os.mkfifo(path), False),
    "a char device": (lambda path: mknod_null(path), False),
    "a symlink to a valid entry": (
        lambda path: path.symlink_to(path.parent / f"{KEY}.slab"),
        False,
    ),
    "a dangling symlink": (lambda path: path.symlink_to("/nonexistent"), False),
}


@pytest.fixture
def cache_with_one_entry(tmp_path: Path) -> tuple[Path, DiskEntry]:
    root = tmp_path / "cache"
    cache = DiskCache(root, 1 << 20)
    return root, put(cache, KEY, PAYLOAD)


def check_valid_entry_still_works(root: Path, good: DiskEntry) -> DiskCache:
    cache = DiskCache(root, 1 << 20)  # a restart: must not raise, block or follow
    assert cache.get(good.key) == good and cache.used == good.file_bytes
    sink = Sink(good.size)
    cache.read_into(good, sink, "layers.0")
    assert bytes(sink.data) == PAYLOAD
    return cache


@pytest.mark.parametrize("kind", sorted(AT_AN_ENTRY_NAME))
def test_junk_at_an_entry_name_is_skipped(
    cache_with_one_entry: tuple[Path, DiskEntry], kind: str
) -> None:
    root, good = cache_with_one_entry
    plant, removed = AT_AN_ENTRY_NAME[kind]
    path = root / OTHER[:2] / f"{OTHER}.slab"
    plant(path)
    cache = check_valid_entry_still_works(root, good)
    assert cache.get(OTHER) is None
    assert os.path.lexists(path) is not removed


@pytest.mark.parametrize("kind", ["a directory", "a FIFO", "a symlink"])
def test_junk_named_like_a_temporary_file_is_left(
    cache_with_one_entry: tuple[Path, DiskEntry], kind: str
) -> None:
    root, good = cache_with_one_entry
    path = root / KEY[:2] / f"{KEY}.1.2.tmp"
    {
        "a directory": lambda: path.mkdir(),
        "a FIFO": lambda: os.mkfifo(path),
        "a symlink": lambda: path.symlink_to(good.path),
    }[kind]()
    check_valid_entry_still_works(root, good)
    assert os.path.lexists(path) and good.path.exists()


def test_foreign_things_are_left_alone(
    cache_with_one_entry: tuple[Path, DiskEntry], tmp_path: Path
) -> None:
    root, good = cache_with_one_entry
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"{OTHER}.slab").write_bytes(raw_entry(meta()))  # valid, but not in the cache
    (outside / f"{OTHER}.1.2.tmp").write_bytes(b"half")
    planted = {
        root / "lost+found": lambda p: p.mkdir(),
        root / "README": lambda p: p.write_text("hello"),
        root / f"{OTHER}.slab": lambda p: p.write_bytes(b"junk at the top"),
        root / "0f": lambda p: p.symlink_to(outside),  # a folder of ours, as a symlink
        root / "1e": lambda p: p.write_bytes(b"a file named as a folder"),
        root / "3c": lambda p: os.mkfifo(p),  # (never opened: it would block)
        root / "2d": lambda p: (p.mkdir(), p.chmod(0o777)),  # others may write there
        root / KEY[:2] / "notes.txt": lambda p: p.write_text("mine"),
        root / KEY[:2] / os.fsdecode(b"\xff\xfe.slab"): lambda p: p.write_bytes(b"x"),
    }
    for path, plant in planted.items():
        plant(path)
    (root / "2d" / f"{'2d' * 16}.slab").write_bytes(raw_entry(meta(key="2d" * 16)))
    cache = check_valid_entry_still_works(root, good)
    assert all(os.path.lexists(path) for path in planted)
    assert sorted(p.name for p in outside.iterdir()) == [f"{OTHER}.1.2.tmp", f"{OTHER}.slab"]
    assert cache.get(OTHER) is None and cache.get("2d" * 16) is None


def test_encode_head_is_what_the_scan_accepts(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    DiskCache(root, 1 << 20)
    (root / "5a").mkdir(mode=0o700)
    head = encode_head(OTHER, len(PAYLOAD), slab_checksum(PAYLOAD))
    (root / "5a" / f"{OTHER}.slab").write_bytes(head + PAYLOAD)
    assert DiskCache(root, 1 << 20).get(OTHER) is not None


# -- the cache directory itself ------------------------------------------------------


def test_a_missing_cache_dir_is_created_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        CacheDir(tmp_path / "a" / "b" / "cache")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b" / "cache").st_mode) == 0o700


def refuse(root: Path, *expected: str) -> None:
    with pytest.raises(UnsafeCacheDir) as err:
        DiskCache(root, 1 << 20)
    for part in expected:
        assert part in str(err.value)


def test_a_symlinked_cache_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "cache").symlink_to(tmp_path / "real")
    refuse(tmp_path / "cache", "is a symbolic link", str(tmp_path / "real"))


def test_a_cache_dir_others_can_write_to_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o777)
    refuse(tmp_path / "cache", str(tmp_path / "cache"), "writable by other users", "0777")
    (tmp_path / "cache").chmod(0o1777)  # sticky is not enough: it is the cache itself
    refuse(tmp_path / "cache", "writable by other users")


def test_a_cache_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    (tmp_path / "cache").mkdir(mode=0o700)
    os.chown(tmp_path / "cache", 65534, 65534)
    refuse(tmp_path / "cache", "owned by uid 65534", f"torpord's uid {os.geteuid()}")


def test_a_cache_dir_under_a_parent_others_can_write_to_is_refused(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o777)
    refuse(tmp_path / "shared" / "cache", "its parent", "writable by other users", "not sticky")
    (tmp_path / "shared").chmod(0o1777)  # like /tmp: others can't rename what is ours
    DiskCache(tmp_path / "shared" / "cache", 1 << 20)


def test_a_file_as_cache_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("")
    refuse(tmp_path / "cache", "is not a directory")
