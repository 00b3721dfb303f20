"""The CUDA backend: device slabs are VMM allocations, the HOST tier is the
pinned pool.

- DEVICE slabs: `cuMemCreate` (pinned device memory, exportable as a POSIX
  fd), padded to the allocation granularity. The daemon maps a slab into its
  own address space only while it copies into or out of it (a window:
  reserve, map, set access ... unmap, free the range), so when a model sleeps
  and its engines have let go, `cuMemRelease` really returns the memory to
  the driver. Engines get a new fd per export (`cuMemExportToShareableHandle`)
  and map it themselves (torpor.agent.cuda).
- HOST slabs: ranges of the pinned pool (torpord.cuda.pinned).
- Copies: `cuMemcpy*Async` on two streams per device (one per direction),
  in pieces with an event after each, so progress is reported as bytes land
  and a pinned range is reused only after its copies completed. The read
  pipeline's bytes reach a device slab through pinned staging buffers.
- Checksums of device slabs run on the GPU (torpord/cuda_kernels/checksum.cu).

NOT YET RUN ON A GPU: written against the driver API's documentation and
cuda-bindings 13. It runs in CI on an emulated driver (tests/emulator: the
same cuda-bindings calls, documented constraints enforced, no kernels);
tests/gpu/test_cuda_backend.py runs it on a device.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import xxhash

from torpord.backends.base import Backend, Budget, DeviceInfo, PoolInfo, Slab
from torpord.core.types import Tier
from torpord.cuda import driver
from torpord.cuda.driver import CudaError, check, context, cu
from torpord.cuda.pinned import ALIGN, PinnedPool
from torpord.errors import InvalidArgument, ResourceExhausted
from torpord.storage.checksum import CHUNK, combine

__all__ = ["CudaBackend"]

log = structlog.get_logger("torpord.cuda")

PIECE = 64 << 20  # bytes per copy piece (one event each)
STAGING = 32 << 20  # bytes per pinned staging buffer of the read path
STAGING_BUFFERS = 4  # per device
# A chunk's many small pieces can reach a slab three ways: one copy each
# ("copies"), one launch of the gather/scatter kernel ("kernel"), or one call
# of the driver's batched copy, cuMemcpyBatchAsync, CUDA >= 12.8 ("batch").
# Which is fastest depends on the GPU, the link and the piece size, so it is
# measured on each device at first use (logged) and chosen by the chunk's mean
# piece size; fewer than this many pieces always go as copies.
SCATTER_MIN_PIECES = 8
MEASURED_SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10)
CALIBRATION_BYTES = 4 << 20


@dataclass
class _Device:
    uuid: str
    ordinal: int
    name: str
    budget: Budget
    granularity: int = 0
    h2d: Any = None  # CUstream
    d2h: Any = None
    staging: queue.Queue[_Staging] = field(default_factory=queue.Queue)
    # [(piece size, fastest method there)] for MEASURED_SIZES, ascending; None
    # until measured (once, under the lock).
    methods: list[tuple[int, str]] | None = None
    measuring: threading.Lock = field(default_factory=threading.Lock)


@dataclass(eq=False)
class _Staging:
    """A pinned buffer the read path copies through, and the event of the
    copy that last read it."""

    address: int
    size: int
    event: Any = None


@dataclass(eq=False)
class _DeviceMemory:
    handle: Any  # CUmemGenericAllocationHandle
    length: int  # padded to the granularity


@dataclass(eq=False)
class _HostRange:
    offset: int


class _Event:
    """A CUDA event recorded on a stream (torpord.cuda.pinned.Completion)."""

    def __init__(self, ordinal: int, stream: Any) -> None:
        d = cu()
        self.ordinal = ordinal
        self.event = check(
            d.cuEventCreate(d.CUevent_flags.CU_EVENT_DISABLE_TIMING), "cuEventCreate"
        )
        check(d.cuEventRecord(self.event, stream), "cuEventRecord")

    def query(self) -> bool:
        d = cu()
        context(self.ordinal)
        (err,) = d.cuEventQuery(self.event)
        if err == d.CUresult.CUDA_ERROR_NOT_READY:
            return False
        check((err,), "cuEventQuery")
        return True

    def synchronize(self) -> None:
        context(self.ordinal)
        check(cu().cuEventSynchronize(self.event), "cuEventSynchronize")

    def __del__(self) -> None:
        # (Possibly run by the garbage collector inside a driver call of this
        # thread: take no lock, leave the thread's current context as it was.)
        with contextlib.suppress(Exception):
            driver.destroy_event(self.ordinal, self.event)


class _PinnedStaging:
    """The read pipeline's staging buffers, page-locked, so a staged chunk
    goes to the device straight from where it was read."""

    def __init__(self, backend: CudaBackend) -> None:
        self._backend = backend

    def take(self, size: int) -> mmap.mmap:
        buffer = mmap.mmap(-1, size)
        address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        try:
            # Registration belongs to a context (PORTABLE: seen by all of them);
            # the read workers are fresh threads with none current.
            self._backend._any_context()
            d = cu()
            flags = d.CU_MEMHOSTREGISTER_PORTABLE | d.CU_MEMHOSTREGISTER_DEVICEMAP
            check(d.cuMemHostRegister(address, size, flags), "cuMemHostRegister")
            try:
                # Where kernels see it (the same address with unified addressing).
                device = int(
                    check(d.cuMemHostGetDevicePointer(address, 0), "cuMemHostGetDevicePointer")
                )
            except BaseException:
                check(d.cuMemHostUnregister(address), "cuMemHostUnregister")
                raise
        except BaseException:
            buffer.close()
            raise
        with self._backend._lock:
            self._backend._pinned_staging[address] = (size, device)
        return buffer

    def give(self, buffer: mmap.mmap) -> None:
        address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        try:
            self._backend._unpin_staging(address)
        finally:
            try:
                buffer.close()
            except BufferError:  # a view still held (by a traceback): freed with it
                log.warning("staging buffer still viewed; freed when the view goes")


class _CudaSink:
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
        if self._slab.tier is Tier.HOST:
            base = self._backend._host_address(self._slab)
            for offset, data in pieces:  # (memmove lets go of the GIL: workers copy at once)
                ctypes.memmove(base + offset, _address(data), data.nbytes)
            return
        # (mapped from the first write to the checksum: once per layer)
        self._backend._keep_window(self._slab)
        self._backend._write_device_many(self._slab, pieces)

    def checksum(self) -> str:
        """The slab's checksum, once every chunk is in (which ends its window)."""
        try:
            return self._backend.checksum(self._slab)
        finally:
            if self._slab.tier is Tier.DEVICE:
                self._backend._drop_window(self._slab)


class CudaBackend(Backend):
    kind = "cuda"
    # An engine that imported a slab keeps its memory alive until it releases
    # it or exits, whatever the daemon frees.
    revocation_frees = False
    # Why the kernels can't run here (prepare() found), or None.
    kernels_unavailable: str | None = None

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
        self._devices: list[_Device] = []
        self._live: dict[Slab, _DeviceMemory | _HostRange] = {}
        self._lock = threading.Lock()
        self._kernels: Any = None
        # The read path's pinned staging: address -> (size, device pointer).
        self._pinned_staging: dict[int, tuple[int, int]] = {}
        self._kernels_lock = threading.Lock()
        # Windows the read path keeps open: slab -> (address, length).
        self._kept: dict[Slab, tuple[int, int]] = {}
        self._kernel_cache = kernel_cache
        self._require_kernels = kernels == "required"
        d = cu()
        try:
            for uid in chosen:
                ordinal = ordinals[uid]
                context(ordinal)
                _, total = driver.mem_info(ordinal)
                capacity = (
                    int(total * device_capacity)
                    if isinstance(device_capacity, float)
                    else device_capacity
                )
                dev = check(d.cuDeviceGet(ordinal), "cuDeviceGet")
                raw = check(d.cuDeviceGetName(256, dev), "cuDeviceGetName")
                name = bytes(raw).split(b"\0", 1)[0].decode(errors="replace")
                device = _Device(uid, ordinal, name, Budget(f"device {uid}", min(capacity, total)))
                device.granularity = int(
                    check(
                        d.cuMemGetAllocationGranularity(
                            self._prop(ordinal),
                            d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM,
                        ),
                        "cuMemGetAllocationGranularity",
                    )
                )
                flags = d.CUstream_flags.CU_STREAM_NON_BLOCKING
                self._devices.append(device)  # (released with the rest on failure)
                device.h2d = check(d.cuStreamCreate(flags), "cuStreamCreate")
                device.d2h = check(d.cuStreamCreate(flags), "cuStreamCreate")
                for _ in range(STAGING_BUFFERS):
                    address = check(
                        d.cuMemHostAlloc(STAGING, d.CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc"
                    )
                    device.staging.put(_Staging(int(address), STAGING))
            self._pool = PinnedPool(host_capacity, host_chunk, context=self._any_context)
            self._host = Budget("host pool", self._pool.capacity)
        except BaseException:
            self._release_devices()
            raise

    # -- information -------------------------------------------------------

    def devices(self) -> Sequence[DeviceInfo]:
        return [
            DeviceInfo(dev.uuid, dev.ordinal, dev.name, dev.budget.info()) for dev in self._devices
        ]

    def host_pool(self) -> PoolInfo:
        return self._host.info()

    def _device(self, uuid: str | None) -> _Device:
        for dev in self._devices:
            if dev.uuid == uuid:
                return dev
        raise InvalidArgument(f"unknown device {uuid!r}", reason="UNKNOWN_DEVICE")

    def _budget(self, tier: Tier, device: str | None) -> Budget:
        if tier is Tier.HOST:
            return self._host
        if tier is Tier.DEVICE:
            return self._device(device).budget
        raise InvalidArgument(f"the cuda backend holds no {tier.value} slabs", reason="BAD_TIER")

    # -- allocation --------------------------------------------------------

    @staticmethod
    def _prop(ordinal: int) -> Any:
        d = cu()
        prop = d.CUmemAllocationProp()
        prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = ordinal
        prop.requestedHandleTypes = (
            d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        )
        return prop

    def _charge(self, tier: Tier, device: str | None, size: int) -> int:
        """The bytes a slab of `size` takes from its budget: on a device, its
        allocation, padded to the granularity; in the pinned pool, its range,
        page-aligned (so the budget never admits what the pool can't place)."""
        if tier is Tier.HOST:
            return max(ALIGN, -(-size // ALIGN) * ALIGN)
        if tier is not Tier.DEVICE:
            return size
        granularity = self._device(device).granularity
        return max(1, -(-size // granularity)) * granularity

    def _create(self, slab: Slab) -> None:
        memory = self._make(slab)
        with self._lock:
            self._live[slab] = memory

    def _make(self, slab: Slab) -> _DeviceMemory | _HostRange:
        if slab.tier is Tier.HOST:
            return _HostRange(self._pool.take(slab.size))
        dev = self._device(slab.device)
        context(dev.ordinal)
        length = self._charge(slab.tier, slab.device, slab.size)
        try:
            handle = check(cu().cuMemCreate(length, self._prop(dev.ordinal), 0), "cuMemCreate")
        except CudaError as err:
            if err.name != "CUDA_ERROR_OUT_OF_MEMORY":
                raise
            free, total = driver.mem_info(dev.ordinal)
            raise ResourceExhausted(
                f"device {dev.uuid}: the driver has {free} of {total} bytes free, {length}"
                " asked (other processes use the rest)",
                reason="OUT_OF_MEMORY",
                metadata={"device": dev.uuid, "asked": length, "driver_free": free},
            ) from err
        return _DeviceMemory(handle, length)

    def free(self, slab: Slab) -> None:
        with self._lock:
            memory = self._live.pop(slab, None)
        if memory is None or slab.freed:
            raise RuntimeError(f"slab {slab.id} ({slab.owner}) freed twice")
        if isinstance(memory, _HostRange):
            self._pool.free(memory.offset, slab.size)
        else:
            try:
                self._drop_window(slab)  # (one the read path kept: a load cut short)
                context(self._device(slab.device).ordinal)
                # The memory returns to the driver once no process maps it: the
                # daemon maps it only inside a copy or a load of it (dropped just
                # above), engines let go before this.
                check(cu().cuMemRelease(memory.handle), "cuMemRelease")
            except BaseException:
                with self._lock:  # not freed: still live, still accounted
                    self._live[slab] = memory
                raise
        self._uncharge(slab)  # (marks it freed)

    def drain(self) -> None:
        for dev in self._devices:
            context(dev.ordinal)
            check(cu().cuStreamSynchronize(dev.h2d), "cuStreamSynchronize")
            check(cu().cuStreamSynchronize(dev.d2h), "cuStreamSynchronize")

    def close(self) -> None:
        with self._lock:
            slabs = list(self._live)
        for slab in slabs:
            self.free(slab)
        self.drain()
        for address in list(self._pinned_staging):  # (a read cut short)
            self._unpin_staging(address)
        self._pool.close()
        self._release_devices()

    def _release_devices(self) -> None:
        d = cu()
        for dev in self._devices:
            context(dev.ordinal)
            while not dev.staging.empty():
                staging = dev.staging.get_nowait()
                if staging.event is not None:
                    staging.event.synchronize()
                check(d.cuMemFreeHost(staging.address), "cuMemFreeHost")
            for stream in (dev.h2d, dev.d2h):
                if stream is not None:
                    check(d.cuStreamDestroy(stream), "cuStreamDestroy")
        self._devices.clear()

    # -- bytes -------------------------------------------------------------

    def _memory(self, slab: Slab) -> _DeviceMemory | _HostRange:
        with self._lock:
            memory = self._live.get(slab)
        if memory is None:
            raise RuntimeError(f"slab {slab.id} ({slab.owner}) is not live")
        return memory

    def _host_address(self, slab: Slab) -> int:
        memory = self._memory(slab)
        assert isinstance(memory, _HostRange)
        return self._pool.address + memory.offset

    def view(self, slab: Slab) -> memoryview:
        memory = self._memory(slab)
        if not isinstance(memory, _HostRange):
            raise InvalidArgument("a device slab has no host view", reason="NOT_HOST_MEMORY")
        return self._pool.view(memory.offset, slab.size)

    @contextlib.contextmanager
    def _window(self, slab: Slab, *, peers: Sequence[int] = ()) -> Iterator[int]:
        """Map a device slab into the daemon for the length of the block; yields
        its address. The whole allocation, at offset 0: the driver maps no
        part of one ("offset ... currently must be zero", cuMemMap). A window
        kept open for the read path (_keep_window) serves instead: it holds no
        count of its users, so only that path's writes and the checksum that
        ends it may use it."""
        dev = self._device(slab.device)
        with self._lock:
            kept = self._kept.get(slab) if not peers else None
        if kept is not None:
            try:
                yield kept[0]
            except BaseException:
                self._settle(dev)
                raise
            return
        address, length = self._map(slab, dev, peers)
        try:
            yield address
        except BaseException:
            self._settle(dev)
            raise
        finally:
            self._unmap(dev, address, length)

    def _map(self, slab: Slab, dev: _Device, peers: Sequence[int] = ()) -> tuple[int, int]:
        memory = self._memory(slab)
        assert isinstance(memory, _DeviceMemory)
        length = memory.length
        d = cu()
        context(dev.ordinal)
        address = check(d.cuMemAddressReserve(length, 0, 0, 0), "cuMemAddressReserve")
        try:
            check(d.cuMemMap(address, length, 0, memory.handle, 0), "cuMemMap")
            try:
                access = []
                for ordinal in (dev.ordinal, *peers):
                    desc = d.CUmemAccessDesc()
                    desc.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
                    desc.location.id = ordinal
                    desc.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
                    access.append(desc)
                check(d.cuMemSetAccess(address, length, access, len(access)), "cuMemSetAccess")
            except BaseException:
                check(d.cuMemUnmap(address, length), "cuMemUnmap")
                raise
        except BaseException:
            check(d.cuMemAddressFree(address, length), "cuMemAddressFree")
            raise
        return int(address), length

    def _unmap(self, dev: _Device, address: int, length: int) -> None:
        d = cu()
        context(dev.ordinal)
        try:
            check(d.cuMemUnmap(address, length), "cuMemUnmap")
        finally:
            check(d.cuMemAddressFree(address, length), "cuMemAddressFree")

    def _settle(self, dev: _Device) -> None:
        """Work queued into a window whose wait failed (an event not made, a
        wait cut short) must not outlive the mapping: wait for the streams."""
        with contextlib.suppress(Exception):
            context(dev.ordinal)
            for stream in (dev.h2d, dev.d2h):
                cu().cuStreamSynchronize(stream)

    def _keep_window(self, slab: Slab) -> None:
        """Keep a device slab mapped until _drop_window (or its free): the read
        path writes a layer in many chunks, and mapping (cuMemMap,
        cuMemSetAccess, cuMemUnmap may synchronise the device) once per layer
        instead of once per chunk keeps it off the copies' way."""
        with self._lock:
            if slab in self._kept:
                return
        dev = self._device(slab.device)
        mapped = self._map(slab, dev)
        with self._lock:
            if slab not in self._kept:
                self._kept[slab] = mapped
                return
        self._unmap(dev, *mapped)  # (another worker mapped it meanwhile)

    def _drop_window(self, slab: Slab) -> None:
        """Unmap a window _keep_window opened. Its users waited for their copies
        (and a failed one for its device's streams: _window)."""
        with self._lock:
            kept = self._kept.pop(slab, None)
        if kept is not None:
            self._unmap(self._device(slab.device), *kept)

    def copy(self, src: Slab, dst: Slab, on_bytes: Callable[[int], None] | None = None) -> None:
        if src.size != dst.size:
            raise ValueError(f"copy between slabs of {src.size} and {dst.size} bytes")
        report = on_bytes or (lambda n: None)
        if src.tier is Tier.HOST and dst.tier is Tier.HOST:
            ctypes.memmove(self._host_address(dst), self._host_address(src), src.size)
            report(src.size)
        elif src.tier is Tier.HOST:
            dev = self._device(dst.device)
            with self._window(dst) as address:
                self._pieces(dev, dev.h2d, "HtoD", address, self._host_address(src), src, report)
        elif dst.tier is Tier.HOST:
            dev = self._device(src.device)
            with self._window(src) as address:
                self._pieces(dev, dev.d2h, "DtoH", self._host_address(dst), address, dst, report)
        else:
            dev, other = self._device(dst.device), self._device(src.device)
            if other is not dev and not self._peers(other, dev):
                self._through_host(src, dst, report)
                return
            # The copy runs on dst's device: src's memory must be open to it.
            peers = [dev.ordinal] if other is not dev else []
            with self._window(dst) as to, self._window(src, peers=peers) as from_:
                self._pieces(dev, dev.h2d, "DtoD", to, from_, dst, report)

    def _peers(self, src: _Device, dst: _Device) -> bool:
        """Whether dst's device can read src's memory directly (P2P)."""
        d = cu()
        ok = check(d.cuDeviceCanAccessPeer(dst.ordinal, src.ordinal), "cuDeviceCanAccessPeer")
        return bool(ok)

    def _through_host(self, src: Slab, dst: Slab, report: Callable[[int], None]) -> None:
        """A copy between GPUs that can't reach each other: through dst's
        pinned staging buffers, one piece at a time."""
        sdev, ddev = self._device(src.device), self._device(dst.device)
        staging = ddev.staging.get()
        try:
            if staging.event is not None:
                staging.event.synchronize()
                staging.event = None
            with self._window(src) as from_, self._window(dst) as to:
                d = cu()
                for at in range(0, src.size, staging.size):
                    n = min(staging.size, src.size - at)
                    context(sdev.ordinal)
                    check(
                        d.cuMemcpyDtoHAsync(staging.address, from_ + at, n, sdev.d2h),
                        "cuMemcpyDtoHAsync",
                    )
                    _Event(sdev.ordinal, sdev.d2h).synchronize()
                    context(ddev.ordinal)
                    check(
                        d.cuMemcpyHtoDAsync(to + at, staging.address, n, ddev.h2d),
                        "cuMemcpyHtoDAsync",
                    )
                    _Event(ddev.ordinal, ddev.h2d).synchronize()
                    report(n)
        finally:
            ddev.staging.put(staging)

    def _pieces(
        self,
        dev: _Device,
        stream: Any,
        kind: str,
        dst: int,
        src: int,
        host_slab: Slab,
        report: Callable[[int], None],
    ) -> None:
        """Queue the copy in pieces (none crossing a pinned chunk), an event
        after each; report each piece as its event completes."""
        d = cu()
        context(dev.ordinal)
        call = getattr(d, f"cuMemcpy{kind}Async")
        if kind == "DtoD":
            spans = [(o, min(PIECE, host_slab.size - o)) for o in range(0, host_slab.size, PIECE)]
        else:
            base = self._memory(host_slab)
            assert isinstance(base, _HostRange)
            spans = [
                (at - base.offset, n)
                for at, n in self._pool.pieces(base.offset, host_slab.size, PIECE)
            ]
        events = []
        failure: BaseException | None = None
        try:
            for offset, n in spans:
                check(call(dst + offset, src + offset, n, stream), f"cuMemcpy{kind}Async")
                events.append((_Event(dev.ordinal, stream), n))
        finally:
            # Every queued piece finishes before the windows close, even when
            # queueing failed part-way or progress reporting raises (a stop).
            for event, n in events:
                event.synchronize()
                if failure is None:
                    try:
                        report(n)
                    except BaseException as err:
                        failure = err
        if failure is not None:
            raise failure

    def _write_device_many(self, slab: Slab, pieces: Sequence[tuple[int, memoryview]]) -> None:
        """Pieces into a device slab. Read into pinned staging (a chunk of the
        read pipeline): one window, one gather/scatter launch or the copies
        queued back to back, one wait. Otherwise piece by piece through the
        device's staging buffers."""
        if not pieces:
            return
        # (Addresses only: nothing here may hold an export of the staging
        # buffer, or a failure's traceback would keep it from closing.)
        spans = [(offset, _address(data), data.nbytes) for offset, data in pieces]
        if not all(self._pinned(at, n) for _, at, n in spans):
            for offset, data in pieces:
                self._write_staged(slab, offset, data)
            return
        dev = self._device(slab.device)
        method = self._method(dev, len(spans), sum(n for _, _, n in spans) // len(spans))
        if method != "copies":
            try:
                (self._scatter if method == "kernel" else self._batch)(dev, slab, spans)
                return
            except Exception:
                log.exception(f"{method} failed: copies instead from now on", device=dev.uuid)
                dev.methods = [
                    (size, "copies" if m == method else m) for size, m in dev.methods or []
                ]
        with self._window(slab) as address:
            context(dev.ordinal)
            for offset, at, n in spans:
                check(
                    cu().cuMemcpyHtoDAsync(address + offset, at, n, dev.h2d),
                    "cuMemcpyHtoDAsync",
                )
            _Event(dev.ordinal, dev.h2d).synchronize()  # before the window closes

    def _batch(
        self,
        dev: _Device,
        slab: Slab,
        spans: Sequence[tuple[int, int, int]],
    ) -> None:
        """The pieces (slab offset, host address, length) into a slab in one
        cuMemcpyBatchAsync."""
        with self._window(slab) as address:
            context(dev.ordinal)
            driver.memcpy_batch(
                [address + offset for offset, _, _ in spans],
                [at for _, at, _ in spans],
                [n for _, _, n in spans],
                dev.h2d,
            )
            _Event(dev.ordinal, dev.h2d).synchronize()  # before the window closes

    def _scatter(
        self,
        dev: _Device,
        slab: Slab,
        spans: Sequence[tuple[int, int, int]],
    ) -> None:
        """The pieces (slab offset, host address, length) of one pinned staging
        buffer into a slab in one launch of the gather/scatter kernel (reading
        the staging buffer over PCIe)."""
        import cupy

        where = self._staging_of(spans[0][1], spans[0][2])
        assert where is not None
        host, device = where
        segments = [(at - host, offset, n) for offset, at, n in spans]
        if any(self._staging_of(host + s, n) != where for s, _, n in segments):
            raise ValueError("pieces from several staging buffers")
        kernels = self._load_kernels()
        with self._window(slab) as address, cupy.cuda.Device(dev.ordinal):
            stream = cupy.cuda.ExternalStream(int(dev.h2d), dev.ordinal)
            kernels.gather_scatter(device, address, segments, stream=stream)
            _Event(dev.ordinal, dev.h2d).synchronize()  # before the window closes

    def _method(self, dev: _Device, count: int, mean: int) -> str:
        """How `count` pieces of `mean` bytes on average go to this device."""
        if count < SCATTER_MIN_PIECES:
            return "copies"
        if dev.methods is None:
            with dev.measuring:  # (one measurement, whichever worker comes first)
                if dev.methods is None and self.kernels_unavailable is not None:
                    dev.methods = []  # (the measurement needs CuPy: copies)
                if dev.methods is None:
                    try:
                        dev.methods = self._measure(dev)
                    except Exception:
                        log.exception("transfer measurement failed: copies only", device=dev.uuid)
                        dev.methods = []
        chosen = next((m for size, m in dev.methods if mean <= size), None)
        if chosen is None:
            chosen = dev.methods[-1][1] if dev.methods else "copies"
        if chosen == "kernel" and self.kernels_unavailable is not None:
            return "copies"
        return chosen

    def _measure(self, dev: _Device) -> list[tuple[int, str]]:
        """Time, once per device, the three ways a chunk's pieces reach device
        memory from pinned staging: one copy each, the gather/scatter kernel,
        and cuMemcpyBatchAsync (where the driver has it), for pieces of 4 KiB
        to 256 KiB (half of them 8-byte but not 16-byte aligned, as safetensors
        offsets often are), on a stream of its own. The fastest at each size."""
        import cupy

        from torpord.cuda.kernels import best_seconds

        kernels = self._load_kernels()
        staging = self.staging()
        buffer = staging.take(CALIBRATION_BYTES)
        host = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        _, device = self._pinned_staging[host]
        d = cu()
        methods: list[tuple[int, str]] = []
        seen: dict[str, dict[str, float]] = {}
        batch_error = ""
        try:
            with cupy.cuda.Device(dev.ordinal):
                target = cupy.empty(CALIBRATION_BYTES, dtype=cupy.uint8)
                stream = cupy.cuda.Stream(non_blocking=True)
                for size in MEASURED_SIZES:
                    count = min(256, (CALIBRATION_BYTES - 16) // size)
                    segments = [(i * size + 8 * (i % 2), i * size, size) for i in range(count)]

                    def copies(segments: list[tuple[int, int, int]] = segments) -> None:
                        for s_off, d_off, n in segments:
                            check(
                                d.cuMemcpyHtoDAsync(
                                    target.data.ptr + d_off, host + s_off, n, stream.ptr
                                ),
                                "cuMemcpyHtoDAsync",
                            )

                    def kernel(segments: list[tuple[int, int, int]] = segments) -> None:
                        kernels.gather_scatter(device, target.data.ptr, segments, stream=stream)

                    def batch(segments: list[tuple[int, int, int]] = segments) -> None:
                        driver.memcpy_batch(
                            [target.data.ptr + d_off for _, d_off, _ in segments],
                            [host + s_off for s_off, _, _ in segments],
                            [n for _, _, n in segments],
                            stream.ptr,
                        )

                    times = {"copies": best_seconds(stream, copies)}
                    times["kernel"] = best_seconds(stream, kernel)
                    if not batch_error:
                        try:
                            times["batch"] = best_seconds(stream, batch)
                        except Exception as err:  # an older driver or bindings
                            batch_error = str(err)
                    seen[f"{count}x{size >> 10}KiB"] = {m: round(t * 1e6) for m, t in times.items()}
                    methods.append((size, min(times, key=times.__getitem__)))
        finally:
            staging.give(buffer)
        log.info(
            "transfer methods measured (microseconds per chunk); the fastest is used",
            device=dev.uuid,
            chosen={f"{size >> 10}KiB": method for size, method in methods},
            runs=seen,
            batch_unavailable=batch_error or None,
        )
        return methods

    def _write_staged(self, slab: Slab, offset: int, data: memoryview) -> None:
        """Pageable bytes into a device slab, through the device's own pinned
        staging buffers, each reused only once its last copy completed."""
        dev = self._device(slab.device)
        src, size = _address(data), data.nbytes
        events = []
        with self._window(slab) as address:
            try:
                for at in range(0, size, STAGING):
                    n = min(STAGING, size - at)
                    staging = dev.staging.get()
                    try:
                        if staging.event is not None:
                            staging.event.synchronize()
                        ctypes.memmove(staging.address, src + at, n)
                        context(dev.ordinal)
                        check(
                            cu().cuMemcpyHtoDAsync(
                                address + offset + at, staging.address, n, dev.h2d
                            ),
                            "cuMemcpyHtoDAsync",
                        )
                        staging.event = _Event(dev.ordinal, dev.h2d)
                        events.append(staging.event)
                    finally:
                        dev.staging.put(staging)
            finally:
                for event in events:  # done before the window closes
                    event.synchronize()

    def read_out(self, slab: Slab) -> Generator[memoryview, None, None]:
        """A device slab's bytes through one of its device's pinned staging
        buffers, a piece at a time (to the disk cache, say)."""
        if slab.tier is Tier.HOST:
            yield from super().read_out(slab)
            return
        dev = self._device(slab.device)
        # A buffer of its own (the device's staging buffers serve the read path
        # and the disk cache may write several layers at once).
        staging = self.staging()
        buffer = staging.take(min(STAGING, max(ALIGN, -(-slab.size // ALIGN) * ALIGN)))
        try:
            host = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
            size = len(buffer)
            with self._window(slab) as address:
                for at in range(0, slab.size, size):
                    n = min(size, slab.size - at)
                    context(dev.ordinal)
                    check(
                        cu().cuMemcpyDtoHAsync(host, address + at, n, dev.d2h),
                        "cuMemcpyDtoHAsync",
                    )
                    _Event(dev.ordinal, dev.d2h).synchronize()
                    with memoryview(buffer)[:n] as piece:
                        yield piece
        finally:
            staging.give(buffer)

    def sink(self, slab: Slab) -> _CudaSink:
        return _CudaSink(self, slab)

    def staging(self) -> _PinnedStaging:
        return _PinnedStaging(self)

    def _any_context(self) -> None:
        context(self._devices[0].ordinal)

    def _unpin_staging(self, address: int) -> None:
        with self._lock:
            known = self._pinned_staging.pop(address, None)
        if known is not None:
            self._any_context()
            check(cu().cuMemHostUnregister(address), "cuMemHostUnregister")

    def _staging_of(self, address: int, size: int) -> tuple[int, int] | None:
        """(start, device pointer) of the pinned staging buffer holding
        [address, address + size), or None."""
        with self._lock:
            for start, (length, device) in self._pinned_staging.items():
                if start <= address and address + size <= start + length:
                    return start, device
        return None

    def _pinned(self, address: int, size: int) -> bool:
        return self._staging_of(address, size) is not None

    def checksum(self, slab: Slab) -> str:
        if slab.tier is Tier.HOST:
            return super().checksum(slab)
        if self.kernels_unavailable is not None:
            with contextlib.closing(self.read_out(slab)) as pieces:
                return _host_checksum(pieces)
        dev = self._device(slab.device)
        kernels = self._load_kernels()
        import cupy

        with self._window(slab) as address, cupy.cuda.Device(dev.ordinal):
            digest: str = kernels.checksum(address, slab.size)
            return digest

    def prepare(self) -> None:
        """Compile (or read from the cache) the kernels now, so a GPU without a
        working CuPy or NVRTC is found at start, not at the first load. Without
        them ("auto"), the backend works on: a chunk's pieces go as copies and
        device slabs' checksums are computed on the host, over a copy."""
        try:
            self._load_kernels()
        except Exception as err:
            if self._require_kernels:
                raise
            self.kernels_unavailable = f"{type(err).__name__}: {err}"
            log.warning(
                "GPU kernels unavailable: pieces go as copies, checksums on the host",
                reason=self.kernels_unavailable,
            )

    def _load_kernels(self) -> Any:
        with self._kernels_lock:  # (the first call compiles, or reads the cache)
            if self._kernels is None:
                from torpord.cuda.kernels import Kernels

                self._kernels = Kernels(self._kernel_cache)
            return self._kernels

    def export(self, slab: Slab) -> int:
        memory = self._memory(slab)
        if not isinstance(memory, _DeviceMemory):
            raise InvalidArgument("only device slabs are exported", reason="NOT_DEVICE_MEMORY")
        d = cu()
        context(self._device(slab.device).ordinal)
        fd = check(
            d.cuMemExportToShareableHandle(
                memory.handle,
                d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            ),
            "cuMemExportToShareableHandle",
        )
        os.set_inheritable(int(fd), False)  # (as the host backend's O_CLOEXEC)
        return int(fd)


def _host_checksum(pieces: Iterator[memoryview]) -> str:
    """The slab checksum (torpord.storage.checksum) of bytes arriving in pieces
    of any size."""
    digests: list[int] = []
    pending = bytearray()
    for piece in pieces:
        at = 0
        if pending:
            at = min(CHUNK - len(pending), piece.nbytes)
            pending += piece[:at]
            if len(pending) == CHUNK:
                digests.append(xxhash.xxh3_64_intdigest(pending))
                pending.clear()
        while piece.nbytes - at >= CHUNK:
            digests.append(xxhash.xxh3_64_intdigest(piece[at : at + CHUNK]))
            at += CHUNK
        pending += piece[at:]
    if pending:
        digests.append(xxhash.xxh3_64_intdigest(pending))
    return combine(digests)


def _address(data: memoryview) -> int:
    """Where a buffer's bytes are (read-only ones too); holds nothing of it."""
    return int(np.frombuffer(data, dtype=np.uint8).ctypes.data)
