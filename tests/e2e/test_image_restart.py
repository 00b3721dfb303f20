"""Images across a daemon restart, under real torpord processes sharing one
disk cache: an image survives only through a complete disk copy (its
manifest names the copies), and a manifest that is not exactly what torpord
wrote is refused and removed without breaking the start."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from torpor import Client
from torpor.v1 import common_pb2

from .conftest import Daemon
from .test_images import same, weights

torch = pytest.importorskip("torch")

from torpor.agent import attach  # noqa: E402
from torpor.agent.publish import find_image, groups_of, publish  # noqa: E402

# (None of these may ever appear in a log line about a refused manifest.)
FP_ASLEEP = "restart-engine/fp-asleep"
FP_WOKEN = "restart-engine/fp-woken"
FP_ACTIVE = "restart-engine/fp-active"
FP_LEVEL1 = "restart-engine/fp-level-1"


def cache_dir(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    return cache


def started(root: Path, cache: Path) -> Daemon:
    d = Daemon(root, config=f'[disk_cache]\npath = "{cache}"\ncapacity = "64MiB"\n')
    d.ready()
    return d


def manifests(cache: Path) -> list[str]:
    folder = cache / "images"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def published(client: Client, model_id: str, fingerprint: str, seed: int) -> None:
    """Publish an image and let go of it (the daemon keeps it)."""
    with publish(model_id, fingerprint, groups_of(weights(seed)), client=client):
        pass


def test_an_image_survives_a_restart_only_through_its_disk_copy(tmp_path: Path) -> None:
    cache = cache_dir(tmp_path)
    d = started(tmp_path / "first", cache)
    try:
        with Client(socket=str(d.socket)) as client:
            published(client, "asleep", FP_ASLEEP, 10)
            client.sleep_model("asleep", level=2)  # its disk copy, then its manifest
            published(client, "woken", FP_WOKEN, 11)
            client.sleep_model("woken", level=2)
            client.wake_model("woken")  # ACTIVE, and its disk copy is still whole
            published(client, "active", FP_ACTIVE, 12)  # never copied to disk
            published(client, "level1", FP_LEVEL1, 13)
            client.sleep_model("level1", level=1)  # in host memory only
            assert len(manifests(cache)) == 2
        assert d.stop() == 0
    finally:
        d.kill()
    assert len(manifests(cache)) == 2  # (a clean stop keeps them)

    d = started(tmp_path / "second", cache)
    try:
        with Client(socket=str(d.socket)) as client:
            models = {m.model_id: m for m in client.list_models()}
            assert sorted(models) == ["asleep", "woken"]
            for model in models.values():
                assert model.state == common_pb2.MODEL_STATE_ASLEEP
                assert model.sleep_level == 2
                assert model.state_reason == "RESTORED"
                assert {layer.tier for layer in model.layers} == {common_pb2.TIER_DISK}
                assert all(layer.checksum for layer in model.layers)
            assert models["asleep"].fingerprint == FP_ASLEEP
            # Found by fingerprint, as a new engine asks; the others are gone.
            assert find_image(FP_ASLEEP, client=client) == "asleep"
            assert find_image(FP_WOKEN, client=client) == "woken"
            assert find_image(FP_ACTIVE, client=client) is None
            assert find_image(FP_LEVEL1, client=client) is None
            found = d.call("torpor.v1.ModelService/ListModels", {"fingerprint": FP_ASLEEP})
            assert [m["model_id"] for m in found["models"]] == ["asleep"]

            woken = client.wake_model("asleep", verify=True)  # (reads and checks the copies)
            assert woken.state == common_pb2.MODEL_STATE_ACTIVE
            with attach("asleep", client=client) as engine:
                assert same(engine.state_dict(), weights(10))
                client.sleep_model("asleep", level=2)  # (its copies serve again)
                client.wake_model("asleep", verify=True)
                with engine.use(timeout=30):
                    assert same(engine.state_dict(), weights(10))
            # An unloaded image does not come back.
            client.unload_model("woken")
            assert len(manifests(cache)) == 1
        assert d.stop() == 0
    finally:
        d.kill()

    d = started(tmp_path / "third", cache)
    try:
        with Client(socket=str(d.socket)) as client:
            assert [m.model_id for m in client.list_models()] == ["asleep"]
            client.wake_model("asleep", verify=True)
            with attach("asleep", client=client) as engine:
                assert same(engine.state_dict(), weights(10))
    finally:
        d.kill()


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A disk cache a stopped torpord left: one image asleep at level 2."""
    root = tmp_path_factory.mktemp("kept")
    cache = cache_dir(root)
    d = started(root / "first", cache)
    try:
        with Client(socket=str(d.socket)) as client:
            published(client, "img", FP_ASLEEP, 20)
            client.sleep_model("img", level=2)
        assert d.stop() == 0
    finally:
        d.kill()
    assert len(manifests(cache)) == 1
    return cache


MARKER = "SECRET-MANIFEST-CONTENT"


def bad_json(manifest: Path, outside: Path) -> str:
    manifest.write_text('{"fingerprint": "' + MARKER)
    return MARKER


def wrong_checksum(manifest: Path, outside: Path) -> str:
    m = json.loads(manifest.read_text())
    m["groups"][1]["checksum"] = "0123456789abcdef"
    manifest.write_text(json.dumps(m))
    return "0123456789abcdef"


def missing_entry(manifest: Path, outside: Path) -> str:
    m = json.loads(manifest.read_text())
    key = m["groups"][2]["key"]
    (manifest.parent.parent / key[:2] / f"{key}.slab").unlink()
    return key


def symlinked(manifest: Path, outside: Path) -> str:
    target = outside / manifest.name
    manifest.rename(target)  # (a valid manifest, elsewhere)
    manifest.symlink_to(target)
    return MARKER


def another_model_id(manifest: Path, outside: Path) -> str:
    m = json.loads(manifest.read_text())
    m["model_id"] = f"../{MARKER}"
    manifest.write_text(json.dumps(m))
    return MARKER


TAMPER: dict[str, Callable[[Path, Path], str]] = {
    "bad JSON": bad_json,
    "a wrong checksum": wrong_checksum,
    "a missing entry": missing_entry,
    "a symlinked manifest": symlinked,
    "an invalid model id": another_model_id,
}


@pytest.mark.parametrize("how", sorted(TAMPER))
def test_a_tampered_manifest_is_refused_and_removed(tmp_path: Path, kept: Path, how: str) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(kept, cache, symlinks=True)
    (name,) = manifests(cache)
    manifest = cache / "images" / name
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = TAMPER[how](manifest, outside)
    planted = outside / name
    before = planted.read_bytes() if planted.exists() else b""

    d = started(tmp_path / "second", cache)  # neither a crash nor a hang
    try:
        log = d.log()  # (manifests are read before the daemon is ready)
        assert "refused an image manifest" in log and name in log
        assert secret not in log and FP_ASLEEP not in log
        assert not os.path.lexists(manifest)
        with Client(socket=str(d.socket)) as client:
            assert client.list_models() == []
            assert find_image(FP_ASLEEP, client=client) is None
            # The start is whole: the image can be published anew.
            published(client, "img", FP_ASLEEP, 20)
        if before:  # what a link pointed to is untouched
            assert planted.read_bytes() == before
    finally:
        d.kill()
