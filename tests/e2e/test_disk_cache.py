"""The disk cache under a real torpord: copies lost behind its back, junk in its
directory, and a directory it must not use."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torpor.testing import make_checkpoint

from .conftest import Daemon
from .residency import check_residency

MAGIC = b"TORPORSLAB\x00\x01"  # (the format's, written here as a stranger would)


def cache_config(cache: Path) -> str:
    return f'[disk_cache]\npath = "{cache}"\ncapacity = "64MiB"\n'


def slab_files(cache: Path) -> dict[str, int]:
    """Every entry file in the cache (regular files, not through a symlink): path → inode."""
    found = {}
    for folder in sorted(cache.iterdir()):
        if folder.is_dir() and not folder.is_symlink():
            for p in sorted(folder.glob("*.slab")):
                if p.is_file() and not p.is_symlink():
                    found[str(p.relative_to(cache))] = p.stat().st_ino
    return found


def disk_used(d: Daemon) -> int:
    return int(d.call("torpor.v1.NodeService/GetNode")["node"]["disk_cache"].get("used_bytes", 0))


def call(d: Daemon, method: str, **request: Any) -> Any:
    return d.call(f"torpor.v1.ModelService/{method}", {**request, "wait": True})["model"]


def test_copies_lost_behind_the_daemon_fall_back_to_the_source(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    d = Daemon(tmp_path, config=cache_config(cache))
    try:
        d.wait_ready()
        ckpt = make_checkpoint(d.models / "m", layers=4, shards=2)
        call(d, "LoadModel", model_id="m", source=str(ckpt))
        call(d, "OffloadModel", model_id="m", layers=["layers.0", "layers.3"], tier="TIER_DISK")
        assert len(slab_files(cache)) == 2
        for path in slab_files(cache):
            (cache / path).unlink()  # deleted behind the daemon's back
        m = call(d, "OffloadModel", model_id="m", tier="TIER_DEVICE", verify=True)
        assert m["state"] == "MODEL_STATE_ACTIVE"
        check_residency(d, "m")
        assert disk_used(d) == 0

        d.ctl("sleep", "m", "--level", "2", "--disk-copy")
        files = sorted(slab_files(cache))
        (cache / files[0]).unlink()
        with open(cache / files[1], "r+b") as f:
            f.seek(-1, os.SEEK_END)
            f.write(b"!")
        m = call(d, "WakeModel", model_id="m", verify=True)
        assert m["state"] == "MODEL_STATE_ACTIVE"
        check_residency(d, "m")
        assert sorted(slab_files(cache)) == files[2:]  # the corrupt one is gone too
        assert disk_used(d) == sum((cache / p).stat().st_size for p in files[2:])
        assert "reading a layer from the source instead" in d.log()
        assert d.stop() == 0
    finally:
        d.kill()


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, int]]:
    """A cache a previous torpord left: every layer of one model (its source, the cache)."""
    root = tmp_path_factory.mktemp("warm")
    cache = root / "cache"
    d = Daemon(root, config=cache_config(cache))
    try:
        d.wait_ready()
        ckpt = make_checkpoint(d.models / "m", layers=3, shards=2)
        call(d, "LoadModel", model_id="m", source=str(ckpt))
        call(d, "OffloadModel", model_id="m", tier="TIER_DISK")
        assert d.stop() == 0
    finally:
        d.kill()
    return ckpt, cache, slab_files(cache)


def raw_entry(meta: bytes) -> bytes:
    head = MAGIC + struct.pack("<I", len(meta)) + meta
    return head + bytes(4096 - len(head)) + b"\0" * 512


def meta_of(name: str, **fields: object) -> bytes:
    return json.dumps({"key": name.removesuffix(".slab"), **fields}).encode()


def plant_tmp_dir(p: Path, _: Path) -> Path:
    tmp = p.with_name(p.name.replace(".slab", ".1.2.tmp"))
    tmp.mkdir()
    return tmp


def plant_folder_link(p: Path, outside: Path) -> Path:
    link = p.parent.parent / outside.name[:2]  # the folder of `outside`'s entry, as a symlink
    link.symlink_to(outside.parent)
    return link


def writes(data: Callable[[Path], bytes]) -> Callable[[Path, Path], Path]:
    def plant(p: Path, _: Path) -> Path:
        p.write_bytes(data(p))
        return p

    return plant


def made(make: Callable[[Path, Path], object]) -> Callable[[Path, Path], Path]:
    def plant(p: Path, outside: Path) -> Path:
        make(p, outside)
        return p

    return plant


# How to plant each kind of junk (at an entry's path, given a valid entry
# outside the cache; returns what was planted), and whether the daemon removes
# it: only regular files of ours are removed, nothing is ever followed.
JUNK: dict[str, tuple[Callable[[Path, Path], Path], bool]] = {
    "meta a JSON list": (writes(lambda p: raw_entry(b"[1, 2]")), True),
    "size null": (
        writes(lambda p: raw_entry(meta_of(p.name, size=None, checksum="0" * 16))),
        True,
    ),
    "nested 2000 deep": (writes(lambda p: raw_entry(b"[" * 2000 + b"]" * 2000)), True),
    "a directory named .tmp": (plant_tmp_dir, False),
    "a directory named .slab": (made(lambda p, _: p.mkdir()), False),
    "a FIFO named .slab": (made(lambda p, _: os.mkfifo(p)), False),
    "a symlink named .slab": (made(lambda p, out: p.symlink_to(out)), False),
    "a symlinked folder": (plant_folder_link, False),
}


@pytest.mark.parametrize("kind", sorted(JUNK))
def test_junk_in_the_cache_dir_is_skipped_and_its_entries_still_serve(
    tmp_path: Path, warm_cache: tuple[Path, Path, dict[str, int]], kind: str
) -> None:
    ckpt, warm, entries = warm_cache
    cache = tmp_path / "cache"
    shutil.copytree(warm, cache, symlinks=True)
    valid = slab_files(cache)
    assert len(valid) == len(entries) == 5
    # Two folder names no valid entry uses (entries' names are content hashes).
    free = sorted({f"{i:02x}" for i in range(256)} - {p.split("/")[0] for p in valid})
    theirs, ours = free[-1], free[-2]
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / f"{theirs * 16}.slab"
    shutil.copyfile(cache / next(iter(valid)), target)  # a valid entry, elsewhere
    (cache / ours).mkdir(mode=0o700)
    plant, removed = JUNK[kind]
    junk = plant(cache / ours / f"{ours * 16}.slab", target)

    d = Daemon(tmp_path, config=cache_config(cache), roots=(ckpt.parent,))
    try:
        d.wait_ready()  # neither a crash nor a hang
        assert "skipped what is not a valid entry" in d.log() and junk.name in d.log()
        assert disk_used(d) == sum((cache / p).stat().st_size for p in valid)
        assert os.path.lexists(junk) is not removed
        assert target.read_bytes() == (cache / next(iter(valid))).read_bytes()  # untouched
        # The valid entries serve: a load takes them, an offload writes none anew.
        call(d, "LoadModel", model_id="m", source=str(ckpt))
        check_residency(d, "m")
        m = call(d, "OffloadModel", model_id="m", tier="TIER_DISK")
        assert {layer["tier"] for layer in m["layers"]} == {"TIER_DISK"}
        assert slab_files(cache) == valid
        call(d, "OffloadModel", model_id="m", tier="TIER_DEVICE", verify=True)
        check_residency(d, "m")
        assert d.stop() == 0
    finally:
        d.kill()


def make_unsafe(cache: Path, how: str) -> str:
    """Make `cache` a directory torpord must not use; what its refusal says."""
    if how == "a symlink":
        real = cache.with_name("real")
        real.mkdir(mode=0o700)
        cache.symlink_to(real)
        return "is a symbolic link"
    cache.mkdir(mode=0o700)
    if how == "world-writable":
        cache.chmod(0o777)
        return "is writable by other users (mode 0777)"
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    os.chown(cache, 65534, 65534)
    return "is owned by uid 65534"


@pytest.mark.parametrize("how", ["a symlink", "world-writable", "another user's"])
def test_an_unsafe_cache_dir_is_refused_at_start(tmp_path: Path, how: str) -> None:
    cache = tmp_path / "cache"
    says = make_unsafe(cache, how)
    d = Daemon(tmp_path, config=cache_config(cache))
    try:
        assert d.proc.wait(30) == 2
        log = d.log()
        assert "disk_cache.path" in log and str(cache) in log and says in log
        assert not d.socket.exists()
        assert list(cache.iterdir()) == []  # nothing written there
    finally:
        d.kill()
