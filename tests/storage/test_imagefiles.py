"""Image manifests: the codec read as attacker input (every field checked,
nothing quoted), and their files in the disk cache (atomic, private, never
followed, left alone by the cache's own scan)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torpord.storage.cachefiles import CacheDir
from torpord.storage.catalogue import CatalogueGroup, CatalogueTensor, plan_image
from torpord.storage.imagefiles import ImageFiles
from torpord.storage.imageformat import (
    MAX_MANIFEST_BYTES,
    BadManifest,
    ImageManifest,
    ManifestGroup,
    catalogue_of,
    decode,
    encode,
    manifest_name,
)

FINGERPRINT = "engine/fused/bf16/tp1 ✓"
SECRET = "SECRET-CONTENT"


def groups() -> tuple[CatalogueGroup, ...]:
    return (
        CatalogueGroup("pre", 512, (CatalogueTensor("embed", "F32", (8, 16), 0),)),
        CatalogueGroup(
            "layers.0",
            1024,
            (
                CatalogueTensor("qkv", "BF16", (3, 64), 0),
                CatalogueTensor("scale", "I32", (), 512),
                CatalogueTensor("empty", "F16", (0, 4), 768),
            ),
        ),
    )


def manifest() -> ImageManifest:
    return ImageManifest(
        FINGERPRINT,
        "img",
        "HOST-1",
        "0123456789abcdef",
        tuple(ManifestGroup(g, f"{i:016x}", f"{i:032x}") for i, g in enumerate(groups(), start=1)),
    )


NAME = manifest_name(FINGERPRINT)


def as_json() -> dict[str, Any]:
    value: dict[str, Any] = json.loads(encode(manifest()))
    return value


def test_a_manifest_round_trips() -> None:
    assert decode(NAME, encode(manifest())) == manifest()
    assert NAME.endswith(".json") and len(NAME) == 32 + 5


def test_catalogue_of_inverts_plan_image() -> None:
    _, plans = plan_image(FINGERPRINT, groups())
    assert tuple(catalogue_of(plan) for plan in plans) == groups()


def changed(edit: Callable[[dict[str, Any]], object]) -> bytes:
    m = as_json()
    edit(m)
    return json.dumps(m).encode()


def group(i: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda m: m["groups"][i]


def tensor(i: int, j: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda m: m["groups"][i]["tensors"][j]


def setting(where: Callable[[dict[str, Any]], dict[str, Any]], key: str, value: object) -> bytes:
    return changed(lambda m: where(m).__setitem__(key, value))


def top(m: dict[str, Any]) -> dict[str, Any]:
    return m


# Each one a manifest torpord would never write, and what the refusal says.
BAD: dict[str, tuple[bytes, str]] = {
    "not JSON": (b'{"model_id": "' + SECRET.encode(), "not valid JSON"),
    "a list": (b'["' + SECRET.encode() + b'"]', "not an object"),
    "too deep": (b"[" * 100 + b"]" * 100, "nested deeper"),
    "a duplicate key": (b'{"a": 1, "a": 2}', "same key twice"),
    "a field more": (setting(top, SECRET, 1), "not an object of exactly"),
    "a field less": (changed(lambda m: m.pop("device")), "not an object of exactly"),
    "another format": (setting(top, "format", SECRET), "not of the format"),
    "another checksum kind": (setting(top, "checksum_kind", SECRET), "another definition"),
    "another fingerprint": (setting(top, "fingerprint", SECRET), "not the one its file name"),
    "a fingerprint not text": (setting(top, "fingerprint", 7), "fingerprint is not a string"),
    "an empty fingerprint": (setting(top, "fingerprint", ""), "fingerprint is not valid"),
    "a model_id not text": (setting(top, "model_id", [SECRET]), "model_id is not a string"),
    "a model_id too long": (setting(top, "model_id", SECRET * 100), "model_id is not a string"),
    "a model_id with a newline": (setting(top, "model_id", SECRET + "\n"), "not of the form"),
    "a short layout hash": (setting(top, "layout_hash", "abc"), "layout hash is not of the"),
    "no groups": (setting(top, "groups", []), "no groups"),
    "groups an object": (setting(top, "groups", {SECRET: 1}), "its groups is not a list"),
    "a size a bool": (setting(group(1), "size", True), "group 1's size is not an integer"),
    "a negative size": (setting(group(0), "size", -1), "group 0's size is not an integer"),
    "a huge size": (setting(group(0), "size", 1 << 80), "group 0's size is not an integer"),
    "a float size": (setting(group(0), "size", 512.0), "group 0's size is not an integer"),
    "a checksum in capitals": (setting(group(1), "checksum", "ABCDEF0123456789"), "checksum"),
    "a key too short": (setting(group(0), "key", "ab"), "group 0's disk cache key"),
    "a key with a slash": (setting(group(0), "key", "../" + "a" * 29), "disk cache key"),
    "a tensor list an object": (setting(group(0), "tensors", {}), "group 0's tensors"),
    "a shape of text": (setting(tensor(1, 0), "shape", SECRET), "tensor 0's shape"),
    "a negative dim": (setting(tensor(1, 0), "shape", [3, -64]), "tensor 0's dimension 1"),
    "a dim null": (setting(tensor(1, 1), "shape", [None]), "tensor 1's dimension 0"),
    "a rank of 65": (setting(tensor(1, 0), "shape", [1] * 65), "tensor 0's shape"),
    "an offset a string": (setting(tensor(1, 1), "offset", "512"), "tensor 1's offset"),
    "a dtype not text": (setting(tensor(0, 0), "dtype", 32), "tensor 0's dtype"),
    "a tensor field more": (setting(tensor(0, 0), SECRET, 0), "tensor 0 is not an object"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_manifest_is_refused_quoting_nothing(kind: str) -> None:
    raw, says = BAD[kind]
    with pytest.raises(BadManifest) as err:
        decode(NAME, raw)
    assert says in str(err.value)
    assert SECRET not in str(err.value) and FINGERPRINT not in str(err.value)


def test_a_huge_manifest_is_refused_before_parsing() -> None:
    with pytest.raises(BadManifest, match="more than"):
        decode(NAME, b" " * (MAX_MANIFEST_BYTES + 1))


# -- the files ---------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> ImageFiles:
    return ImageFiles(CacheDir(tmp_path / "cache"))


def test_a_manifest_is_written_private_and_read_back(files: ImageFiles) -> None:
    old = os.umask(0)  # (whatever the umask: 0600 in a 0700 folder)
    try:
        files.write(NAME, encode(manifest()))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(files.folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(files.folder / NAME).st_mode) == 0o600
    assert os.listdir(files.folder) == [NAME]  # (no temporary file left)
    assert files.scan() == ([NAME], [])
    assert decode(NAME, files.read(NAME)) == manifest()
    files.write(NAME, b"{}")  # (replaced whole)
    assert files.read(NAME) == b"{}"
    assert files.remove(NAME) and not files.remove(NAME)
    assert files.scan() == ([], [])


def test_no_images_folder_is_no_manifest(files: ImageFiles) -> None:
    assert files.scan() == ([], [])


def test_the_scan_drops_unfinished_writes_and_leaves_what_is_not_ours(files: ImageFiles) -> None:
    files.write(NAME, b"{}")
    tmp = files.folder / f"{NAME.removesuffix('.json')}.1f.0a0b.tmp"
    tmp.write_bytes(b"half")
    (files.folder / "notes.txt").write_text(SECRET)
    (files.folder / f"{'ab' * 16}.tmp").mkdir()  # (not our temporary name)
    names, skipped = files.scan()
    assert names == [NAME]
    assert not tmp.exists()
    assert {(Path(s.path).name, s.removed) for s in skipped} == {
        (tmp.name, True),
        ("notes.txt", False),
        (f"{'ab' * 16}.tmp", False),
    }
    assert (files.folder / "notes.txt").read_text() == SECRET


def test_a_symlink_at_a_manifest_name_is_never_followed(files: ImageFiles, tmp_path: Path) -> None:
    files.write("f" * 32 + ".json", b"{}")
    target = tmp_path / "elsewhere.json"
    target.write_bytes(encode(manifest()))
    (files.folder / NAME).symlink_to(target)
    with pytest.raises(BadManifest, match="not a regular file"):
        files.read(NAME)
    assert files.remove(NAME)  # the link goes ...
    assert target.read_bytes() == encode(manifest())  # ... what it points to stays


def test_a_fifo_at_a_manifest_name_never_blocks(files: ImageFiles) -> None:
    files.write("f" * 32 + ".json", b"{}")
    os.mkfifo(files.folder / NAME)
    with pytest.raises(BadManifest, match="not a regular file"):
        files.read(NAME)
    assert files.remove(NAME)


def test_a_directory_at_a_manifest_name_is_left(files: ImageFiles) -> None:
    files.write("f" * 32 + ".json", b"{}")
    (files.folder / NAME).mkdir()
    with pytest.raises(BadManifest, match="not a regular file"):
        files.read(NAME)
    assert not files.remove(NAME)
    assert (files.folder / NAME).is_dir()


def test_a_file_larger_than_any_manifest_is_not_read(files: ImageFiles) -> None:
    files.write(NAME, b"{}")
    os.truncate(files.folder / NAME, MAX_MANIFEST_BYTES + 1)  # (sparse: nothing written)
    with pytest.raises(BadManifest, match="more than"):
        files.read(NAME)


@pytest.mark.parametrize("how", ["a symlink", "world-writable", "a file"])
def test_an_images_folder_not_ours_is_reported_and_not_used(
    tmp_path: Path, files: ImageFiles, how: str
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / NAME).write_bytes(encode(manifest()))
    if how == "a symlink":
        files.folder.symlink_to(elsewhere)
    elif how == "world-writable":
        files.folder.mkdir()
        files.folder.chmod(0o777)
        (files.folder / NAME).write_bytes(encode(manifest()))
    else:
        files.folder.write_bytes(b"")
    names, skipped = files.scan()
    assert names == [] and len(skipped) == 1 and not skipped[0].removed
    assert "not a directory of ours" in skipped[0].why
    with pytest.raises(OSError):
        files.write(NAME, b"{}")
    assert (elsewhere / NAME).read_bytes() == encode(manifest())


def test_the_cache_scan_leaves_the_images_folder_to_them(files: ImageFiles) -> None:
    files.write(NAME, encode(manifest()))
    found, skipped = CacheDir(files.folder.parent).scan()
    assert found == [] and skipped == []
    assert files.scan() == ([NAME], [])
