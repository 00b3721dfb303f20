"""Opening sources: every file checked as opened, regular files only, no hangs."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from torpor.testing import make_checkpoint
from torpord.errors import FailedPrecondition, InvalidArgument, PermissionDenied, TorporError
from torpord.storage import check_unchanged, open_checkpoint, plan_layers, read_tensors
from torpord.storage.pipeline import ReadOptions, read_layers
from torpord.storage.safetensors import INDEX_FILE, SINGLE_FILE, Checkpoint
from torpord.storage.sources import resolve_path, resolve_source

from .sinks import Sink

SECRETS = ("db_password=hunter2", "api_key=SK-123456")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    (tmp_path / "outside").mkdir()
    return tmp_path / "outside"


def refused(path: Path, root: Path) -> PermissionDenied:
    with pytest.raises(PermissionDenied) as info:
        open_checkpoint(path, allowed_roots=(str(root),))
    assert info.value.reason == "SOURCE_NOT_ALLOWED"
    return info.value


def no_secret(err: TorporError) -> None:
    for secret in SECRETS:
        assert secret not in err.message
        assert all(secret not in v for v in err.metadata.values())


# --- the allowed roots, checked on what is opened ------------------------------------


def test_an_index_symlinked_outside_the_roots_is_never_read(root: Path, outside: Path) -> None:
    # The case: the index is someone else's file; its content must not
    # come back in an error (nor be read at all).
    secret = outside / "notes.json"
    secret.write_text(json.dumps({"weight_map": {SECRETS[0]: SECRETS[1] + ".safetensors"}}))
    secret.chmod(0o600)
    model = make_checkpoint(root / "m", layers=1, shards=2)
    (model / INDEX_FILE).unlink()
    (model / INDEX_FILE).symlink_to(secret)
    err = refused(model, root)
    no_secret(err)
    assert f"{model / INDEX_FILE} resolves to {secret}, which is outside" in err.message
    assert err.metadata["real_path"] == str(secret)


def test_a_shard_symlinked_outside_is_named_by_its_entry(root: Path, outside: Path) -> None:
    model = make_checkpoint(root / "m", layers=1, shards=2)
    shard = model / "model-00002-of-00002.safetensors"
    os.replace(shard, outside / "elsewhere.safetensors")
    shard.symlink_to(outside / "elsewhere.safetensors")
    err = refused(model, root)
    assert "the file that weight_map's" in err.message and "model-00002" not in err.message
    assert f"resolves to {outside / 'elsewhere.safetensors'}" in err.message


def test_a_source_symlinked_outside_names_where_it_resolves(root: Path, outside: Path) -> None:
    target = make_checkpoint(outside / "t.safetensors", layers=1)
    link = root / "link.safetensors"
    link.symlink_to(target)
    err = refused(link, root)
    assert err.message.startswith(f"{link} resolves to {target}, which is outside")
    with pytest.raises(PermissionDenied) as info:
        resolve_source(str(link), (root,))
    assert f"source {link} resolves to {target}, which is outside" in info.value.message


@pytest.mark.parametrize("where", ["source", "index", "single"])
def test_a_missing_target_outside_is_refused_like_an_existing_one(
    root: Path, outside: Path, where: str
) -> None:
    # No oracle for which paths exist outside the roots: both are refused unopened.
    for target in (outside / "exists", outside / "does-not-exist"):
        if target.name == "exists":
            target.write_text("{}")
        model = root / f"m-{target.name}"
        if where == "source":
            model.symlink_to(target)
        else:
            model.mkdir()
            (model / (INDEX_FILE if where == "index" else SINGLE_FILE)).symlink_to(target)
        assert str(target) in refused(model, root).message


def test_symlinks_inside_the_roots_keep_working(root: Path) -> None:
    # The Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<hash>.
    made = make_checkpoint(root / "made", layers=2, shards=2)
    snapshot = root / "hub" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (root / "hub" / "blobs").mkdir()
    for i, f in enumerate(sorted(made.iterdir())):
        os.replace(f, root / "hub" / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    link = root / "current"
    link.symlink_to(snapshot)
    ckpt = open_checkpoint(link, allowed_roots=(str(root),))
    assert ckpt.path == str(snapshot)
    assert [Path(f.path).parent for f in ckpt.files] == [snapshot, snapshot]
    t = ckpt.tensors[0]
    assert read_tensors(ckpt, [(t, 0)], memoryview(bytearray(t.nbytes))) == t.nbytes
    assert check_unchanged(ckpt) is None
    assert resolve_source(str(link), (root,)) == str(snapshot)


# --- regular files only, and nothing that can block ----------------------------------


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("where", ["index", "shard", "single", "source"])
def test_a_fifo_is_refused_without_blocking(root: Path, where: str) -> None:
    model = make_checkpoint(root / "m", layers=1, shards=1 if where == "single" else 2)
    if where == "source":
        model = fifo(root / "pipe.safetensors")
    else:
        name = {
            "index": INDEX_FILE,
            "shard": "model-00001-of-00002.safetensors",
            "single": SINGLE_FILE,
        }
        (model / name[where]).unlink()
        fifo(model / name[where])
    with pytest.raises(InvalidArgument) as info:
        open_checkpoint(model, allowed_roots=(str(root),))
    assert info.value.reason == "UNSUPPORTED_SOURCE" and "is a FIFO" in info.value.message


@pytest.mark.parametrize(
    ("target", "kind"),
    [("/dev/null", "a character device"), ("/dev/zero", "a character device"), (".", "a dir")],
)
def test_devices_and_directories_as_shards_are_refused(root: Path, target: str, kind: str) -> None:
    model = make_checkpoint(root / "m", layers=1, shards=2)
    shard = model / "model-00001-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to(target)
    with pytest.raises(InvalidArgument) as info:
        open_checkpoint(model, allowed_roots=("/",))  # (every path is inside "/")
    assert info.value.reason == "UNSUPPORTED_SOURCE" and f"is {kind}" in info.value.message


def test_a_socket_as_the_single_file_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "m"  # (a short path: socket names are limited)
    model.mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(model / SINGLE_FILE))
        with pytest.raises(InvalidArgument) as info:
            open_checkpoint(model)
    assert "is a socket" in info.value.message


@pytest.fixture
def swapped(root: Path) -> tuple[Checkpoint, Path]:
    """A checkpoint opened, then its file replaced by a FIFO no one writes:
    a read-only open of it would block for ever."""
    path = make_checkpoint(root / "m.safetensors", layers=2)
    ckpt = open_checkpoint(path, allowed_roots=(str(root),))
    path.unlink()
    return ckpt, fifo(path)


def test_reads_refuse_a_file_swapped_for_a_fifo(swapped: tuple[Checkpoint, Path]) -> None:
    ckpt, _ = swapped
    t = ckpt.tensors[0]
    with pytest.raises(FailedPrecondition) as info:
        read_tensors(ckpt, [(t, 0)], memoryview(bytearray(t.nbytes)))
    assert info.value.reason == "SOURCE_CHANGED" and "replaced" in info.value.message
    message = check_unchanged(ckpt)
    assert message is not None and "replaced" in message
    plans = plan_layers(ckpt)
    for direct in ("on", "off", "auto"):
        with pytest.raises(FailedPrecondition):
            read_layers(ckpt, plans, [Sink(p.size) for p in plans], ReadOptions(direct=direct))


def test_a_replaced_file_is_said_without_what_replaced_it(root: Path, outside: Path) -> None:
    path = make_checkpoint(root / "m.safetensors", layers=1)
    ckpt = open_checkpoint(path)
    secret = outside / "secret"
    secret.write_bytes(b"\0" * 123457)
    path.unlink()
    path.symlink_to(secret)
    message = check_unchanged(ckpt)
    assert message is not None and "replaced" in message and "123457" not in message
    t = ckpt.tensors[0]
    with pytest.raises(FailedPrecondition) as info:
        read_tensors(ckpt, [(t, 0)], memoryview(bytearray(t.nbytes)))
    assert "123457" not in info.value.message


# --- resolving a path that changes under us ------------------------------------------


def test_resolve_path_agrees_with_realpath(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "rel").symlink_to("a/b")
    (tmp_path / "abs").symlink_to(tmp_path / "a")
    (tmp_path / "up").symlink_to("a/b/../..")
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    for path in (
        tmp_path / "rel" / "x",
        tmp_path / "abs" / "b" / ".." / "b",
        tmp_path / "up" / "a",
        tmp_path / "missing" / ".." / "a",
        tmp_path / "a" / "b" / "c" / "d",
    ):
        assert resolve_path(str(path)) == os.path.realpath(path), path
    assert resolve_path(str(tmp_path / "loop1")).startswith(str(tmp_path))
    assert resolve_path("/") == "/" and resolve_path("/..") == "/"
