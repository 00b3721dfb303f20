"""The host backend: emulated devices whose slabs are memfd files.

Each slab, DEVICE or HOST, is its own memfd (so the agent can later receive it
with SCM_RIGHTS and map it at a fixed address) mapped once into the daemon.
Its name, `torpor:{model}:{layer}:{tier}`, shows in /proc/<pid>/fd and maps,
which is how operators (and the end-to-end tests) can see what the daemon
holds. Freeing closes the mapping and the fd, so the kernel returns the pages
once no other process maps them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import socket
import threading
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torpord.backends.base import Backend, Budget, DeviceInfo, PoolInfo, Slab
from torpord.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from torpord.types import Tier

__all__ = ["HostBackend"]

# Copies run in pieces, spread over the copy threads (ctypes.memmove releases
# the GIL), as a GPU spreads a copy over its copy engines.
_COPY_PIECE = 16 * 2**20
_NAMESPACE = uuidlib.UUID("6f1d3c1e-6a0b-4f7e-9a53-0c2a8f6b7d10")


def _machine_id() -> str:
    try:
        with open("/etc/machine-id") as f:
            return f.read().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


@dataclass(eq=False)
class _Mapping:
    fd: int
    mm: mmap.mmap
    anchor: ctypes.Array[ctypes.c_char]  # keeps the mapping's address for memmove

    @property
    def address(self) -> int:
        return ctypes.addressof(self.anchor)


class _HostSink:
    """The read pipeline's way into a host backend slab: every slab here is
    host memory, so the pipeline can read straight into it."""

    def __init__(self, backend: HostBackend, slab: Slab) -> None:
        self._backend = backend
        self._slab = slab

    def view(self) -> memoryview:
        return self._backend.view(self._slab)

    def write(self, offset: int, data: memoryview) -> None:
        if offset < 0 or offset + data.nbytes > self._slab.size:
            raise ValueError(f"write of {data.nbytes} bytes at {offset} past the slab's end")
        # ctypes.memmove releases the GIL, so the pipeline's workers copy in parallel.
        source = (ctypes.c_char * data.nbytes).from_buffer(data)
        try:
            ctypes.memmove(self._backend._mapping(self._slab).address + offset, source, data.nbytes)
        finally:
            del source

    def write_many(self, pieces: Sequence[tuple[int, memoryview]]) -> None:
        for offset, data in pieces:
            self.write(offset, data)

    def checksum(self) -> str:
        return self._backend.checksum(self._slab)


class HostBackend(Backend):
    kind = "host"

    def __init__(
        self,
        *,
        devices: int,
        device_capacity: int,
        host_capacity: int,
        copy_threads: int = 4,
        copy_piece: int = _COPY_PIECE,
    ) -> None:
        """`copy_threads` copy the pieces (of `copy_piece` bytes) of one copy at once."""
        if devices < 1:
            raise InvalidArgument("the host backend needs at least one device")
        super().__init__()
        machine = _machine_id()
        self._devices: list[tuple[str, Budget]] = []
        for index in range(devices):
            uid = "HOST-" + str(uuidlib.uuid5(_NAMESPACE, f"{machine}/{index}"))
            self._devices.append((uid, Budget(f"device {uid}", device_capacity)))
        self._host = Budget("host pool", host_capacity)
        self._live: dict[Slab, _Mapping] = {}
        self._lock = threading.Lock()
        self._copy_piece = max(1, copy_piece)
        self._copiers = concurrent.futures.ThreadPoolExecutor(
            max(1, copy_threads), thread_name_prefix="torpord-copy"
        )
        # Closing a slab's last fd hands its pages back to the kernel, which
        # takes a while for gigabytes; that happens here, off the caller's path.
        self._reaper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="torpord-free")
        self._reaping: set[concurrent.futures.Future[None]] = set()

    # -- information -------------------------------------------------------

    def devices(self) -> Sequence[DeviceInfo]:
        return [
            DeviceInfo(uid, index, f"Torpor emulated device {index}", budget.info())
            for index, (uid, budget) in enumerate(self._devices)
        ]

    def host_pool(self) -> PoolInfo:
        return self._host.info()

    def _budget(self, tier: Tier, device: str | None) -> Budget:
        if tier is Tier.HOST:
            return self._host
        if tier is Tier.DEVICE:
            for uid, budget in self._devices:
                if uid == device:
                    return budget
            raise InvalidArgument(f"unknown device {device!r}", reason="UNKNOWN_DEVICE")
        raise InvalidArgument(f"the host backend holds no {tier.value} slabs", reason="BAD_TIER")

    # -- allocation --------------------------------------------------------

    def _create(self, slab: Slab) -> None:
        mapping = self._map(slab)
        with self._lock:
            self._live[slab] = mapping

    def _map(self, slab: Slab) -> _Mapping:
        name = f"torpor:{slab.owner.model_id}:{slab.owner.layer}:{slab.tier.value.lower()}"
        # (Sealable: a published image's slabs are sealed once written.)
        fd = os.memfd_create(name[:240], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            # A memfd is created mode 0777: an engine of another user could open
            # its read-only export again, writable, through /proc/self/fd (and
            # write or truncate what every engine maps). Only its owner may.
            os.fchmod(fd, 0o600)
            # A mapping cannot be empty; a slab of zero bytes still gets a page.
            length = max(slab.size, 1)
            os.ftruncate(fd, length)
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as err:
            os.close(fd)
            raise ResourceExhausted(
                f"could not create a {slab.size}-byte slab: {err.strerror}",
                reason="OUT_OF_MEMORY",
                metadata={"asked": slab.size},
            ) from err
        anchor = (ctypes.c_char * length).from_buffer(mm)
        return _Mapping(fd, mm, anchor)

    def free(self, slab: Slab) -> None:
        with self._lock:
            mapping = self._live.get(slab)
        if mapping is None or slab.freed:
            raise RuntimeError(f"slab {slab.id} ({slab.owner}) freed twice")
        # Unmap first: if a view of it is still alive, mmap refuses (BufferError)
        # and the slab stays live and accounted, rather than half freed.
        del mapping.anchor
        try:
            mapping.mm.close()
        except BufferError:
            mapping.anchor = (ctypes.c_char * len(mapping.mm)).from_buffer(mapping.mm)
            raise
        future = self._reaper.submit(_release, mapping.fd)
        with self._lock:
            del self._live[slab]
            self._reaping.add(future)
        future.add_done_callback(self._reaped)
        self._uncharge(slab)  # (marks it freed)

    def _reaped(self, future: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._reaping.discard(future)

    def drain(self) -> None:
        with self._lock:
            pending = list(self._reaping)
        concurrent.futures.wait(pending)

    def close(self) -> None:
        with self._lock:
            slabs = list(self._live)
        for slab in slabs:
            self.free(slab)
        self.drain()
        self._copiers.shutdown(wait=True)
        # (Its idle thread would otherwise keep the daemon's exit waiting.)
        self._reaper.shutdown(wait=True)

    # -- bytes -------------------------------------------------------------

    def _mapping(self, slab: Slab) -> _Mapping:
        with self._lock:
            mapping = self._live.get(slab)
        if mapping is None:
            raise RuntimeError(f"slab {slab.id} ({slab.owner}) is not live")
        return mapping

    def view(self, slab: Slab) -> memoryview:
        return memoryview(self._mapping(slab).mm)[: slab.size]

    def copy(self, src: Slab, dst: Slab, on_bytes: Callable[[int], None] | None = None) -> None:
        if src.size != dst.size:
            raise ValueError(f"copy between slabs of {src.size} and {dst.size} bytes")
        a, b = self._mapping(src).address, self._mapping(dst).address

        def piece(offset: int) -> None:
            n = min(self._copy_piece, src.size - offset)
            ctypes.memmove(b + offset, a + offset, n)
            if on_bytes is not None:
                on_bytes(n)

        futures = [self._copiers.submit(piece, o) for o in range(0, src.size, self._copy_piece)]
        # Wait for every piece, even after one failed: none may still be
        # writing when the caller frees the slabs.
        concurrent.futures.wait(futures)
        for future in futures:
            future.result()

    def sink(self, slab: Slab) -> _HostSink:
        return _HostSink(self, slab)

    def export(self, slab: Slab, *, writable: bool = False) -> int:
        # A new open of the memfd, read-only: the engine can map the weights but
        # never write them, and each consumer holds its own open file. A
        # writer (an image's publisher) may write, but never change the size:
        # what it grew would be memory no budget charged, and a shrink it
        # could add itself (F_SEAL_SHRINK) before we know, so we add it
        # first: from then on the slab is one that no free can take back
        # from a process mapping it (frees_on_revocation).
        fd = self._mapping(slab).fd
        fixed = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
        # (Once added, never again: the writer may have locked the seals since.)
        if writable and fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fixed != fixed:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fixed)
        mode = os.O_RDWR if writable else os.O_RDONLY
        return os.open(f"/proc/self/fd/{fd}", mode | os.O_CLOEXEC)

    def frees_on_revocation(self, slab: Slab) -> bool:
        """A free truncates the memfd, taking its pages back from any process
        that maps it; but not a memfd sealed against shrinking (a published
        image's, from its writable export on): its pages live as long as a
        mapping does, so they must stay charged while an engine may hold one."""
        if not self.revocation_frees:
            return False
        with self._lock:
            mapping = self._live.get(slab)
        if mapping is None:
            return True  # (freed already: nothing to hold)
        return not fcntl.fcntl(mapping.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK

    def seal(self, slab: Slab) -> None:
        """F_SEAL_WRITE: no write(), and no new shared writable mapping, by
        anyone; and no change of size (a writer that shrank it would fault the
        daemon's next read). The kernel refuses it (EBUSY) while any process
        still maps the file shared and writable, the daemon included: so the
        daemon's own mapping becomes a private one first (reads see the file;
        a write of the daemon's would stay its own)."""
        fd = self._mapping(slab).fd
        self._check_size(slab, fd)
        self._map_private(slab)
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
        where = f"slab {slab.owner.layer!r} of model {slab.owner.model_id!r}"
        metadata = {"model_id": slab.owner.model_id, "layer": slab.owner.layer}
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        except OSError as err:
            if err.errno == errno.EBUSY:
                raise FailedPrecondition(
                    f"{where} is still mapped writable by a process: its writer must unmap"
                    " it before the commit",
                    reason="STILL_MAPPED_WRITABLE",
                    metadata=metadata,
                ) from None
            # EPERM: a writer added F_SEAL_SEAL; fine if it sealed all of these.
            if err.errno != errno.EPERM or fcntl.fcntl(fd, fcntl.F_GET_SEALS) & seals != seals:
                raise FailedPrecondition(
                    f"{where} cannot be sealed: its writer locked its seals (F_SEAL_SEAL)",
                    reason="SEALS_LOCKED",
                    metadata=metadata,
                ) from None
        self._check_size(slab, fd)  # (sealed: it stays so)

    def _map_private(self, slab: Slab) -> None:
        """The daemon's mapping of the slab, made private. (Its own function:
        an error raised later must not keep the buffers alive in a frame its
        traceback holds, or the slab could never be freed.)"""
        old = self._mapping(slab)
        length = max(slab.size, 1)
        try:
            mm = mmap.mmap(old.fd, length, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        except ValueError:  # (shrunk meanwhile: "mmap length is greater than file size")
            self._check_size(slab, old.fd)
            raise
        anchor = (ctypes.c_char * length).from_buffer(mm)
        del old.anchor
        try:
            old.mm.close()
        except BufferError:  # (a view of it is alive: keep it; the seal fails)
            old.anchor = (ctypes.c_char * len(old.mm)).from_buffer(old.mm)
            del anchor
            mm.close()
            raise
        with self._lock:
            self._live[slab] = _Mapping(old.fd, mm, anchor)

    def _check_size(self, slab: Slab, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size != max(slab.size, 1):
            raise FailedPrecondition(
                f"slab {slab.owner.layer!r} of model {slab.owner.model_id!r} was resized by"
                f" its writer ({size} bytes, not {slab.size})",
                reason="SLAB_RESIZED",
                metadata={"model_id": slab.owner.model_id, "layer": slab.owner.layer},
            )

    def fd(self, slab: Slab) -> int:
        """The slab's memfd (for exporting to agents)."""
        return self._mapping(slab).fd


def _release(fd: int) -> None:
    # Truncating first frees the pages even while an engine that never let go
    # (revoked) still maps them: its next access faults (SIGBUS) instead of
    # reading bytes the daemon no longer owns, and the memory is really free.
    try:
        # (EPERM: an image's slab, sealed against shrinking; the pages go when
        # the last mapping does, and are counted held till then: held_by.)
        with contextlib.suppress(PermissionError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
