"""The host backend: memfd slabs, exact budgets, all-or-nothing allocation, copies."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from torpord.backends.base import SlabOwner
from torpord.backends.host import HostBackend
from torpord.errors import InvalidArgument, ResourceExhausted
from torpord.types import Tier

OWNER = SlabOwner("m", "layers.0")


@pytest.fixture
def backend() -> Iterator[HostBackend]:
    b = HostBackend(devices=2, device_capacity=10_000, host_capacity=5_000)
    yield b
    b.close()


def test_devices_have_stable_uuids() -> None:
    a = HostBackend(devices=2, device_capacity=1, host_capacity=1)
    b = HostBackend(devices=2, device_capacity=1, host_capacity=1)
    assert [d.uuid for d in a.devices()] == [d.uuid for d in b.devices()]
    assert len({d.uuid for d in a.devices()}) == 2
    assert all(d.uuid.startswith("HOST-") for d in a.devices())


def test_accounting_is_exact(backend: HostBackend) -> None:
    dev = backend.devices()[1].uuid
    slabs = backend.allocate(Tier.DEVICE, dev, [(1000, OWNER), (2345, OWNER)])
    info = backend.devices()[1].pool
    assert (info.used, info.free, info.slab_count) == (3345, 10_000 - 3345, 2)
    assert backend.devices()[0].pool.used == 0
    backend.free(slabs[0])
    assert backend.devices()[1].pool.used == 2345
    with pytest.raises(RuntimeError, match="twice"):
        backend.free(slabs[0])
    backend.free(slabs[1])
    assert backend.devices()[1].pool.used == 0


def test_too_much_takes_nothing(backend: HostBackend) -> None:
    backend.allocate(Tier.HOST, None, [(4000, OWNER)])
    with pytest.raises(ResourceExhausted) as err:
        backend.allocate(Tier.HOST, None, [(500, OWNER), (600, OWNER)])
    assert err.value.metadata == {
        "pool": "host pool",
        "asked": "1100",
        "free": "1000",
        "budget": "5000",
    }
    assert backend.host_pool().used == 4000 and backend.host_pool().slab_count == 1


def test_failure_part_way_frees_what_it_took() -> None:
    # The budget admits a slab no address space can map: the second of three
    # fails for real (mmap: ENOMEM) after the first was made.
    huge = 1 << 62
    backend = HostBackend(devices=1, device_capacity=1, host_capacity=huge + 1000)
    try:
        fds_before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(ResourceExhausted) as err:
            backend.allocate(Tier.HOST, None, [(100, OWNER), (huge, OWNER), (100, OWNER)])
        assert err.value.reason == "OUT_OF_MEMORY"
        assert backend.host_pool().used == 0 and backend.host_pool().slab_count == 0
        backend.drain()  # the freed slab's fd is closed in the background
        assert set(os.listdir("/proc/self/fd")) <= fds_before
    finally:
        backend.close()


def test_slabs_are_named_memfds_and_close_frees_them(backend: HostBackend) -> None:
    dev = backend.devices()[0].uuid
    (slab,) = backend.allocate(Tier.DEVICE, dev, [(4096, OWNER)])
    fd = backend.fd(slab)
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:torpor:m:layers.0:device")
    backend.close()
    assert backend.devices()[0].pool.used == 0
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the kernel frees the pages once nobody maps them


def test_copy_moves_bytes_in_pieces() -> None:
    backend = HostBackend(devices=1, device_capacity=10_000, host_capacity=5_000, copy_piece=1000)
    try:
        dev = backend.devices()[0].uuid
        (src,) = backend.allocate(Tier.DEVICE, dev, [(4500, OWNER)])
        (dst,) = backend.allocate(Tier.HOST, None, [(4500, OWNER)])
        payload = os.urandom(4500)
        with backend.view(src) as view:
            view[:] = payload
        pieces: list[int] = []
        backend.copy(src, dst, pieces.append)
        assert sorted(pieces) == [500, 1000, 1000, 1000, 1000]
        with backend.view(dst) as view:
            assert bytes(view) == payload
    finally:
        backend.close()


def test_bad_tier_and_device(backend: HostBackend) -> None:
    with pytest.raises(InvalidArgument):
        backend.allocate(Tier.DISK, None, [(1, OWNER)])
    with pytest.raises(InvalidArgument):
        backend.allocate(Tier.DEVICE, "GPU-nope", [(1, OWNER)])
    with pytest.raises(InvalidArgument) as err:
        backend.resolve_device("devices/GPU-nope")
    assert err.value.reason == "UNKNOWN_DEVICE"
    uuid = backend.devices()[1].uuid
    assert backend.resolve_device(f"devices/{uuid}") == uuid
    assert backend.pick_device() == backend.devices()[0].uuid


def test_a_slab_still_viewed_is_not_half_freed(backend: HostBackend) -> None:
    (slab,) = backend.allocate(Tier.HOST, None, [(100, OWNER)])
    view = backend.view(slab)
    with pytest.raises(BufferError):
        backend.free(slab)
    assert not slab.freed and backend.host_pool().used == 100
    view.release()
    backend.free(slab)
    assert slab.freed and backend.host_pool().used == 0
