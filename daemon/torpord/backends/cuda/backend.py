"""CudaBackend: the Backend on NVIDIA GPUs, composed of the package's parts
(see the package's docstring)."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Generator, Sequence
from pathlib import Path

from torpord.backends.base import Backend, Budget, DeviceInfo, PoolInfo, Slab
from torpord.backends.cuda.checksum import host_checksum
from torpord.backends.cuda.copies import Copies
from torpord.backends.cuda.device import Device, open_device, release_device, synchronize
from torpord.backends.cuda.loader import KernelLoader
from torpord.backends.cuda.memory import DeviceMemory, HostRange, Live, create, export, release
from torpord.backends.cuda.staging import PinnedStaging, address_of
from torpord.backends.cuda.windows import Windows
from torpord.backends.cuda.writes import Writes
from torpord.cuda import driver
from torpord.cuda.driver import context
from torpord.cuda.pinned import ALIGN, PinnedPool
from torpord.errors import InvalidArgument
from torpord.types import Tier

__all__ = ["CudaBackend", "CudaSink"]


class CudaSink:
    """The read pipeline's way into a slab: host slabs take the bytes
    directly; device slabs through pinned staging buffers."""

    def __init__(self, backend: CudaBackend, slab: Slab) -> None:
        self._backend = backend
        self._slab = slab

    def view(self) -> memoryview | None:
        return self._backend.view(self._slab) if self._slab.tier is Tier.HOST else None

    def write(self, offset: int, data: memoryview) -> None:
        self.write_many([(offset, data)])

    def write_many(self, pieces: Sequence[tuple[int, memoryview]]) -> None:
        for offset, data in pieces:
            if offset < 0 or offset + data.nbytes > self._slab.size:
                raise ValueError(f"write of {data.nbytes} bytes at {offset} past the slab's end")
        backend = self._backend
        if self._slab.tier is Tier.HOST:
            base = backend._copies.host_address(self._slab)
            for offset, data in pieces:  # (memmove lets go of the GIL: workers copy at once)
                ctypes.memmove(base + offset, address_of(data), data.nbytes)
            return
        # (mapped from the first write to the checksum: once per layer)
        backend._windows.keep(self._slab)
        backend._writes.write_many(self._slab, pieces)

    def checksum(self) -> str:
        """The slab's checksum, once every chunk is in (which ends its window)."""
        try:
            return self._backend.checksum(self._slab)
        finally:
            if self._slab.tier is Tier.DEVICE:
                self._backend._windows.drop(self._slab)


class CudaBackend(Backend):
    kind = "cuda"
    # An engine that imported a slab keeps its memory alive until it releases
    # it or exits, whatever the daemon frees.
    revocation_frees = False

    def __init__(
        self,
        *,
        devices: Sequence[str] = (),
        device_capacity: float | int = 0.9,
        host_capacity: int,
        host_chunk: int = 1 << 30,
        kernel_cache: Path | None = None,
        kernels: str = "auto",
    ) -> None:
        """`devices`: UUIDs to use (all visible if empty). `device_capacity`:
        a share of each device's total memory (a float), or bytes (an int).
        `kernels`: "required" makes prepare() fail without working kernels;
        "auto" goes on without them (see prepare())."""
        super().__init__()
        ordinals = driver.device_ordinals()
        chosen = list(devices) or list(ordinals)
        unknown = [u for u in chosen if u not in ordinals]
        if unknown:
            raise InvalidArgument(
                f"no visible GPU has UUID {', '.join(unknown)}; visible: {', '.join(ordinals)}",
                reason="UNKNOWN_DEVICE",
            )
        self._devices: list[Device] = []
        self._kernels = KernelLoader(kernel_cache, required=kernels == "required")
        try:
            for uid in chosen:
                open_device(uid, ordinals[uid], device_capacity, self._devices)
            self._pool = PinnedPool(host_capacity, host_chunk, context=self._any_context)
            self._host = Budget("host pool", self._pool.capacity)
        except BaseException:
            self._release_devices()
            raise
        self._live = Live(self._devices)
        self._windows = Windows(self._live)
        self._staging = PinnedStaging(self._any_context)
        self._copies = Copies(self._live, self._windows, self._pool)
        self._writes = Writes(self._live, self._windows, self._staging, self._kernels)

    @property
    def kernels_unavailable(self) -> str | None:
        """Why the kernels can't run here (prepare() found), or None."""
        return self._kernels.unavailable

    # -- information -------------------------------------------------------

    def devices(self) -> Sequence[DeviceInfo]:
        return [
            DeviceInfo(dev.uuid, dev.ordinal, dev.name, dev.budget.info()) for dev in self._devices
        ]

    def host_pool(self) -> PoolInfo:
        return self._host.info()

    def device(self, uuid: str | None) -> Device:
        """The device of that UUID, as the backend holds it."""
        return self._live.device(uuid)

    def _budget(self, tier: Tier, device: str | None) -> Budget:
        if tier is Tier.HOST:
            return self._host
        if tier is Tier.DEVICE:
            return self.device(device).budget
        raise InvalidArgument(f"the cuda backend holds no {tier.value} slabs", reason="BAD_TIER")

    # -- allocation --------------------------------------------------------

    def _charge(self, tier: Tier, device: str | None, size: int) -> int:
        """The bytes a slab of `size` takes from its budget: on a device, its
        allocation, padded to the granularity; in the pinned pool, its range,
        page-aligned (so the budget never admits what the pool can't place)."""
        if tier is Tier.HOST:
            return max(ALIGN, -(-size // ALIGN) * ALIGN)
        if tier is not Tier.DEVICE:
            return size
        granularity = self.device(device).granularity
        return max(1, -(-size // granularity)) * granularity

    def _create(self, slab: Slab) -> None:
        memory: DeviceMemory | HostRange
        if slab.tier is Tier.HOST:
            memory = HostRange(self._pool.take(slab.size))
        else:
            length = self._charge(slab.tier, slab.device, slab.size)
            memory = create(self.device(slab.device), length)
        self._live.add(slab, memory)

    def free(self, slab: Slab) -> None:
        memory = self._live.pop(slab)
        if memory is None or slab.freed:
            raise RuntimeError(f"slab {slab.id} ({slab.owner}) freed twice")
        if isinstance(memory, HostRange):
            self._pool.free(memory.offset, slab.size)
        else:
            try:
                self._windows.drop(slab)  # (one the read path kept: a load cut short)
                # The memory returns to the driver once no process maps it: the
                # daemon maps it only inside a copy or a load of it (dropped just
                # above), engines let go before this.
                release(self.device(slab.device), memory)
            except BaseException:
                self._live.add(slab, memory)  # not freed: still live, still accounted
                raise
        self._uncharge(slab)  # (marks it freed)

    def drain(self) -> None:
        for dev in self._devices:
            synchronize(dev)

    def close(self) -> None:
        for slab in self._live.slabs():
            self.free(slab)
        self.drain()
        self._staging.close()  # (a read cut short)
        self._pool.close()
        self._release_devices()

    def _release_devices(self) -> None:
        for dev in self._devices:
            release_device(dev)
        self._devices.clear()

    def _any_context(self) -> None:
        context(self._devices[0].ordinal)

    # -- bytes -------------------------------------------------------------

    def view(self, slab: Slab) -> memoryview:
        memory = self._live.memory(slab)
        if not isinstance(memory, HostRange):
            raise InvalidArgument("a device slab has no host view", reason="NOT_HOST_MEMORY")
        return self._pool.view(memory.offset, slab.size)

    def copy(self, src: Slab, dst: Slab, on_bytes: Callable[[int], None] | None = None) -> None:
        if src.size != dst.size:
            raise ValueError(f"copy between slabs of {src.size} and {dst.size} bytes")
        self._copies.copy(src, dst, on_bytes or (lambda n: None))

    def read_out(self, slab: Slab) -> Generator[memoryview, None, None]:
        """A device slab's bytes through a pinned staging buffer of its own, a
        piece at a time (to the disk cache, say)."""
        if slab.tier is Tier.HOST:
            yield from super().read_out(slab)
            return
        yield from self._writes.read_out(slab)

    def sink(self, slab: Slab) -> CudaSink:
        return CudaSink(self, slab)

    def staging(self) -> PinnedStaging:
        return self._staging

    def checksum(self, slab: Slab) -> str:
        if slab.tier is Tier.HOST:
            return super().checksum(slab)
        if self._kernels.unavailable is not None:
            with contextlib.closing(self.read_out(slab)) as pieces:
                return host_checksum(pieces)
        dev = self.device(slab.device)
        kernels = self._kernels.load()
        import cupy

        with self._windows.window(slab) as address, cupy.cuda.Device(dev.ordinal):
            digest: str = kernels.checksum(address, slab.size)
            return digest

    def prepare(self) -> None:
        """Compile (or read from the cache) the kernels now, so a GPU without a
        working CuPy or NVRTC is found at start, not at the first load. Without
        them ("auto"), the backend works on: a chunk's pieces go as copies and
        device slabs' checksums are computed on the host, over a copy."""
        self._kernels.prepare()

    def export(self, slab: Slab, *, writable: bool = False) -> int:
        # (One handle either way: what an importer may do is the access it
        # sets on its mapping. The checksum taken at commit, which verify
        # checks, is what holds a published image's bytes here.)
        memory = self._live.memory(slab)
        if not isinstance(memory, DeviceMemory):
            raise InvalidArgument("only device slabs are exported", reason="NOT_DEVICE_MEMORY")
        return export(self.device(slab.device), memory)
