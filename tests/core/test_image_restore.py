"""Images across a restart, through the manager on the real host backend and
a real disk cache: the manifest written when the last layer gets its disk
copy (and only for an image), rolled back with its transition, removed at
unload; the image registered again at start, asleep, from its copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torpord.core.manager import ModelManager
from torpord.errors import ResourceExhausted, Unavailable
from torpord.storage.catalogue import CatalogueGroup, CatalogueTensor
from torpord.storage.diskcache import DiskCache
from torpord.storage.imageformat import manifest_name
from torpord.types import ModelState, Tier

from .harness import Harness, disk_harness

FP = "core-engine/fp"
GROUPS = ["pre", "layers.0", "layers.1", "post"]


def payload(fingerprint: str, name: str, salt: bytes = b"") -> bytes:
    return (salt + f"{fingerprint}:{name}:".encode() * 200)[:1024]


async def publish(
    h: Harness, model_id: str, fingerprint: str = FP, salt: bytes = b""
) -> dict[str, bytes]:
    """Publish an image of four groups, as an engine would; its groups' bytes."""
    catalogue = [
        CatalogueGroup(name, 1024, (CatalogueTensor(f"{name}.w", "U8", (1024,), 0),))
        for name in GROUPS
    ]
    model = await h.manager.images.begin(
        model_id, fingerprint, catalogue, device="", publisher="engine"
    )
    for layer in model.layers:
        assert layer.slab is not None
        with h.backend.view(layer.slab) as view:
            view[:] = payload(fingerprint, layer.plan.name, salt)
    await h.manager.images.commit(model_id, "engine")
    return {name: payload(fingerprint, name, salt) for name in GROUPS}


def bytes_of(h: Harness, model_id: str) -> dict[str, bytes]:
    out = {}
    for layer in h.manager.registry.models[model_id].layers:
        assert layer.slab is not None and layer.slab.tier is Tier.DEVICE
        with h.backend.view(layer.slab) as view:
            out[layer.plan.name] = bytes(view)
    return out


def manifests(tmp_path: Path) -> list[str]:
    folder = tmp_path / "cache" / "images"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def restarted(h: Harness, tmp_path: Path) -> tuple[Harness, list[str]]:
    """Stop `h` as the daemon stops; a new one on the same cache, restored."""
    await h.close()
    h = disk_harness(tmp_path)
    return h, await h.manager.restore_images()


def disk(manager: ModelManager) -> DiskCache:
    assert manager.disk is not None
    return manager.disk


async def test_an_image_comes_back_asleep_from_its_disk_copy(tmp_path: Path) -> None:
    h = disk_harness(tmp_path)
    try:
        want = await publish(h, "img")
        assert manifests(tmp_path) == []
        await h.manager.sleep("img", 2)
        assert manifests(tmp_path) == [manifest_name(FP)]
        h, restored = await restarted(h, tmp_path)
        assert restored == ["img"]
        m = h.manager.get("img")
        assert (m.state, m.sleep_level, m.fingerprint) == (ModelState.ASLEEP, 2, FP)
        assert [layer.tier for layer in m.layers] == [Tier.DISK] * 4
        assert h.manager.list_models(FP) == [m]
        # Its copies are a live model's: never evicted to make room.
        cache = disk(h.manager)
        keys = h.manager.registry.disk_keys()
        assert len(keys) == 4 and all(cache.get(k) is not None for k in keys)
        with pytest.raises(ResourceExhausted) as err:
            cache.check_room([cache.capacity - cache.used], keys)
        assert err.value.reason == "DISK_FULL"
        m = await h.manager.wake("img", verify=True)
        assert m.state is ModelState.ACTIVE
        assert bytes_of(h, "img") == want
    finally:
        await h.close()


async def test_a_model_from_a_source_keeps_no_manifest(tmp_path: Path, ckpt: Path) -> None:
    h = disk_harness(tmp_path)
    try:
        await h.manager.load("m", str(ckpt))
        await h.manager.sleep("m", 2, disk_copy=True)
        assert manifests(tmp_path) == []
        h, restored = await restarted(h, tmp_path)
        assert restored == [] and h.manager.list_models() == []
    finally:
        await h.close()


async def test_offloads_that_leave_every_layer_a_copy_keep_the_image(tmp_path: Path) -> None:
    h = disk_harness(tmp_path)
    try:
        want = await publish(h, "img")
        await h.manager.offload("img", ["layers.0", "layers.1"], Tier.DISK)
        assert manifests(tmp_path) == []  # (pre and post have no copy)
        await h.manager.offload("img", ["pre", "post"], Tier.DISK)
        assert manifests(tmp_path) == [manifest_name(FP)]
        await h.manager.offload("img", [], Tier.DEVICE)  # (ACTIVE, copies still whole)
        h, restored = await restarted(h, tmp_path)
        assert restored == ["img"]
        await h.manager.wake("img", verify=True)
        assert bytes_of(h, "img") == want
    finally:
        await h.close()


async def test_an_unloaded_image_does_not_come_back(tmp_path: Path) -> None:
    h = disk_harness(tmp_path)
    try:
        await publish(h, "img")
        await publish(h, "other", "core-engine/other")
        await h.manager.sleep("img", 2)
        await h.manager.sleep("other", 2)
        await h.manager.unload("img")
        assert manifests(tmp_path) == [manifest_name("core-engine/other")]
        h, restored = await restarted(h, tmp_path)
        assert restored == ["other"]
    finally:
        await h.close()


async def test_a_manifest_that_cannot_be_written_rolls_the_sleep_back(tmp_path: Path) -> None:
    h = disk_harness(tmp_path)
    try:
        want = await publish(h, "img")
        (tmp_path / "cache" / "images").write_bytes(b"")  # (no folder can be made there)
        with pytest.raises(Unavailable) as err:
            await h.manager.sleep("img", 2)
        assert err.value.reason == "DISK_WRITE_FAILED"
        m = h.manager.get("img")
        assert m.state is ModelState.ACTIVE
        assert [layer.tier for layer in m.layers] == [Tier.DEVICE] * 4
        assert h.manager.registry.disk_keys() == set() and disk(h.manager).used == 0
        assert bytes_of(h, "img") == want
        (tmp_path / "cache" / "images").unlink()
        await h.manager.sleep("img", 2)  # (and once it can, it is)
        assert manifests(tmp_path) == [manifest_name(FP)]
    finally:
        await h.close()


def edit(tmp_path: Path, fingerprint: str, **fields: object) -> None:
    path = tmp_path / "cache" / "images" / manifest_name(fingerprint)
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


async def test_an_image_whose_device_is_gone_comes_back_on_another(tmp_path: Path) -> None:
    h = disk_harness(tmp_path)
    try:
        await publish(h, "img")
        await h.manager.sleep("img", 2)
        edit(tmp_path, FP, device="HOST-no-such-device")
        h, restored = await restarted(h, tmp_path)
        assert restored == ["img"]
        assert h.manager.get("img").device == h.backend.pick_device()
    finally:
        await h.close()


async def test_two_manifests_of_one_model_id_restore_one(tmp_path: Path) -> None:
    h = disk_harness(tmp_path)
    try:
        await publish(h, "a", "core-engine/a")
        await publish(h, "b", "core-engine/b")
        await h.manager.sleep("a", 2)
        await h.manager.sleep("b", 2)
        edit(tmp_path, "core-engine/b", model_id="a")
        h, restored = await restarted(h, tmp_path)
        assert restored == ["a"]
        assert len(manifests(tmp_path)) == 1  # (the other refused and removed)
        (fingerprint,) = {m.fingerprint for m in h.manager.list_models()}
        assert manifests(tmp_path) == [manifest_name(fingerprint)]
    finally:
        await h.close()


async def test_an_image_published_again_with_other_bytes_gets_its_own_copies(
    tmp_path: Path,
) -> None:
    """A fingerprint that does not capture everything (an engine's mistake)
    must not make a later image reuse the copies of an earlier one."""
    h = disk_harness(tmp_path)
    try:
        await publish(h, "img")
        await h.manager.sleep("img", 2)
        await h.manager.unload("img")  # (its copies stay in the cache, unused)
        want = await publish(h, "img", FP, salt=b"other bytes")
        await h.manager.sleep("img", 2)
        await h.manager.wake("img", verify=True)
        assert bytes_of(h, "img") == want
        h, restored = await restarted(h, tmp_path)
        assert restored == ["img"]
        await h.manager.wake("img", verify=True)
        assert bytes_of(h, "img") == want
    finally:
        await h.close()
