"""Sealing a published image's slabs, and what exports may do (host backend).

An image's writer gets a writable fd of its slab; after the commit's seal
no fd (its own, one opened again through /proc, the daemon's) may change
the bytes or the size, the daemon still reads and frees the slab, and it
never faults on it. Read-only exports stay read-only even to a process
that opens them again through /proc.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from torpord.backends.base import Slab, SlabOwner
from torpord.backends.host import HostBackend
from torpord.errors import FailedPrecondition
from torpord.storage.checksum import slab_checksum
from torpord.types import Tier

OWNER = SlabOwner("img", "pre")
SIZE = 3 * 4096 + 100  # (not a whole number of pages)


@pytest.fixture
def backend() -> Iterator[HostBackend]:
    b = HostBackend(devices=1, device_capacity=1 << 20, host_capacity=1 << 20)
    yield b
    b.close()


def device_slab(backend: HostBackend, size: int = SIZE) -> Slab:
    (slab,) = backend.allocate(Tier.DEVICE, backend.devices()[0].uuid, [(size, OWNER)])
    return slab


def written(backend: HostBackend, slab: Slab) -> bytes:
    """Fill the slab through a writable export, as a publisher does; the bytes."""
    payload = os.urandom(slab.size)
    fd = backend.export(slab, writable=True)
    try:
        with mmap.mmap(fd, slab.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            mm[:] = payload
    finally:
        os.close(fd)
    return payload


def access_mode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def test_export_is_read_only_unless_asked_writable(backend: HostBackend) -> None:
    slab = device_slab(backend)
    ro, rw = backend.export(slab), backend.export(slab, writable=True)
    try:
        assert access_mode(ro) == os.O_RDONLY and access_mode(rw) == os.O_RDWR
        with pytest.raises(OSError):
            os.pwrite(ro, b"x", 0)
        with pytest.raises(PermissionError):
            mmap.mmap(ro, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.pwrite(rw, b"x", 0)
        with backend.view(slab) as view:
            assert view[0:1] == b"x"
    finally:
        os.close(ro)
        os.close(rw)


def test_seal_refuses_writes_through_every_fd(backend: HostBackend) -> None:
    slab = device_slab(backend)
    payload = written(backend, slab)
    kept = backend.export(slab, writable=True)  # (a writer that kept its fd)
    try:
        backend.seal(slab)
        reopened = os.open(f"/proc/self/fd/{backend.fd(slab)}", os.O_RDWR)
        try:
            for fd in (kept, reopened, backend.fd(slab)):
                with pytest.raises(PermissionError):
                    os.pwrite(fd, b"x", 0)
                with pytest.raises(PermissionError):
                    mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                # Nor its size: a shrunk slab would fault the daemon's next read.
                for size in (0, 4096, SIZE * 2):
                    with pytest.raises(PermissionError):
                        os.ftruncate(fd, size)
                with pytest.raises(OSError):
                    os.posix_fallocate(fd, 0, SIZE * 2)
        finally:
            os.close(reopened)
        # A private mapping is the writer's own copy: the slab doesn't change.
        with mmap.mmap(kept, SIZE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) as mine:
            mine[:4] = b"EVIL"
        # The daemon still reads it: view, checksum, and a copy out.
        with backend.view(slab) as view:
            assert bytes(view) == payload
        assert backend.checksum(slab) == slab_checksum(memoryview(payload))
        (host,) = backend.allocate(Tier.HOST, None, [(SIZE, OWNER)])
        backend.copy(slab, host)
        with backend.view(host) as view:
            assert bytes(view) == payload
        backend.free(host)
    finally:
        os.close(kept)
    backend.free(slab)
    assert backend.devices()[0].pool.used == 0


def test_a_writable_mapping_in_this_process_fails_the_seal(backend: HostBackend) -> None:
    slab = device_slab(backend)
    fd = backend.export(slab, writable=True)
    mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        mm[:5] = b"hello"
        with pytest.raises(FailedPrecondition) as err:
            backend.seal(slab)
        assert err.value.reason == "STILL_MAPPED_WRITABLE"
        assert err.value.metadata == {"model_id": "img", "layer": "pre"}
        mm[5:10] = b"world"  # (not sealed: nothing was added)
        with backend.view(slab) as view:
            assert bytes(view[:10]) == b"helloworld"
    finally:
        mm.close()
        os.close(fd)
    backend.seal(slab)  # once the writer let go
    assert backend.checksum(slab)
    backend.free(slab)


def test_a_writable_mapping_in_another_process_fails_the_seal(backend: HostBackend) -> None:
    slab = device_slab(backend)
    fd = backend.export(slab, writable=True)
    child = textwrap.dedent(
        f"""
        import mmap, sys
        mm = mmap.mmap({fd}, {SIZE}, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mm[:4] = b"kid!"
        print("mapped", flush=True)
        sys.stdin.readline()
        mm.close()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child],
        pass_fds=[fd],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    os.close(fd)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "mapped"
        with pytest.raises(FailedPrecondition) as err:
            backend.seal(slab)
        assert err.value.reason == "STILL_MAPPED_WRITABLE"
        # The daemon reads what the child wrote, and can still free the slab.
        with backend.view(slab) as view:
            assert bytes(view[:4]) == b"kid!"
    finally:
        proc.stdin.close()
        assert proc.wait(30) == 0
        proc.stdout.close()
    backend.free(slab)
    assert backend.devices()[0].pool.used == 0


def test_a_writer_cannot_change_its_slabs_size(backend: HostBackend) -> None:
    # Growing would hold memory the budget never charged; shrinking would
    # fault the daemon's next read of it (SIGBUS), and a writer that sealed
    # it against shrinking itself would keep its pages past a free that the
    # daemon believed took them back: the daemon seals both first.
    slab = device_slab(backend)
    assert backend.frees_on_revocation(slab)
    fd = backend.export(slab, writable=True)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, SIZE + (1 << 20))
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", SIZE + 4096)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4096)
        assert os.fstat(fd).st_size == SIZE
    finally:
        os.close(fd)
    assert not backend.frees_on_revocation(slab)
    backend.free(slab)


def test_a_slab_resized_before_the_seal_is_refused_not_faulted(backend: HostBackend) -> None:
    # The daemon reads the slab (its checksum) right after sealing: a slab
    # whose size changed (here through the daemon's own fd, as only a process
    # that can open it again as root could) gets an error, not a SIGBUS.
    slab = device_slab(backend)
    os.ftruncate(backend.fd(slab), 4096)
    with pytest.raises(FailedPrecondition) as err:
        backend.seal(slab)
    assert err.value.reason == "SLAB_RESIZED"
    assert "img" in err.value.message and "pre" in err.value.message
    backend.free(slab)
    assert backend.devices()[0].pool.used == 0


def memfds(name: str) -> list[str]:
    """What of this process still refers to a memfd named `name`: fds and maps."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if name in os.readlink(f"/proc/self/fd/{fd}"):
                out.append(f"fd {fd}")
        except OSError:
            continue
    with open("/proc/self/maps") as maps:
        out += [line for line in maps if name in line]
    return out


@pytest.mark.parametrize("sealed", [False, True])
def test_a_freed_slab_its_writer_still_maps_stays_charged_until_it_lets_go(
    backend: HostBackend, sealed: bool
) -> None:
    """A writable export seals the memfd against shrinking (and so does a
    commit's seal): the daemon's free can't truncate it, so its pages live
    as long as the writer's mapping. The daemon lets go of all it held, and
    the pool counts the pages held for the writer until it lets go."""
    slab = device_slab(backend)
    fd = backend.export(slab, writable=True)
    writer = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    writer[:4] = b"mine"
    if sealed:
        writer.close()
        backend.seal(slab)
        writer = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
    name = "torpor:img:pre:device"

    def pool() -> tuple[int, int]:
        info = backend.devices()[0].pool
        return info.used, info.held

    try:
        assert len(mapped(name)) == 2  # the daemon's mapping and the writer's
        backend.held_by(slab, os.getpid(), "writer")  # (the core: it went away mapping it)
        backend.free(slab)
        backend.drain()
        # The writer's mapping still reads (nothing truncated it): no fault;
        # and the pages it keeps alive are counted, as held.
        assert writer[:4] == b"mine" and os.fstat(fd).st_size == SIZE
        assert len(mapped(name)) == 1  # the writer's alone
        assert pool() == (SIZE, SIZE)
    finally:
        writer.close()
        os.close(fd)
    assert memfds(name) == []  # nothing refers to it: the kernel frees the pages
    assert backend.let_go(os.getpid(), "writer") == SIZE
    assert pool() == (0, 0)


def mapped(name: str) -> list[str]:
    return [ref for ref in memfds(name) if not ref.startswith("fd ")]


def test_seal_twice_is_fine_and_a_gone_slab_is_an_error(backend: HostBackend) -> None:
    slab = device_slab(backend)
    backend.seal(slab)
    backend.seal(slab)
    backend.free(slab)
    with pytest.raises(RuntimeError, match="not live"):
        backend.seal(slab)


def as_nobody(script: str, fd: int) -> subprocess.CompletedProcess[str]:
    """`script` run by user and group 65534 (the child drops root itself:
    the interpreter may live where that user can't read)."""
    drop = "import os\nos.setgroups([])\nos.setgid(65534)\nos.setuid(65534)\n"
    return subprocess.run(
        [sys.executable, "-c", drop + script],
        pass_fds=[fd],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_another_user_cannot_open_a_read_only_export_writable(backend: HostBackend) -> None:
    """The daemon (root) hands an engine of another user a read-only fd: the
    engine must not turn it into a writable one through /proc (then write or
    truncate the weights every engine shares, or fault the daemon)."""
    slab = device_slab(backend)
    with backend.view(slab) as view:
        view[:4] = b"good"
    fd = backend.export(slab)
    try:
        out = as_nobody(
            textwrap.dedent(
                f"""
                import os
                try:
                    w = os.open("/proc/self/fd/{fd}", os.O_RDWR)
                except PermissionError:
                    print("refused")
                else:
                    os.pwrite(w, b"EVIL", 0)
                    os.ftruncate(w, 0)
                    print("wrote")
                """
            ),
            fd,
        )
    finally:
        os.close(fd)
    assert out.stdout.strip() == "refused", out.stderr
    with backend.view(slab) as view:
        assert bytes(view[:4]) == b"good"
    backend.free(slab)


def test_seal_reports_other_errors(backend: HostBackend) -> None:
    # A writer that sealed the seals (F_SEAL_SEAL) makes the commit's seal
    # impossible: a FailedPrecondition naming the slab, not an internal error.
    slab = device_slab(backend)
    fd = backend.export(slab, writable=True)
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
    finally:
        os.close(fd)
    with pytest.raises(FailedPrecondition) as err:
        backend.seal(slab)
    assert err.value.reason == "SEALS_LOCKED"
    backend.free(slab)


def test_a_writer_that_locked_the_seals_still_gets_its_fds(backend: HostBackend) -> None:
    # (Its next request for the slab must not become an internal error.)
    slab = device_slab(backend)
    first = backend.export(slab, writable=True)
    fcntl.fcntl(first, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
    os.close(first)
    again = backend.export(slab, writable=True)
    try:
        assert access_mode(again) == os.O_RDWR
        with pytest.raises(PermissionError):
            os.ftruncate(again, SIZE * 2)
    finally:
        os.close(again)
    backend.free(slab)
