"""Mapping windows: the daemon maps a device slab into its own address space
only while it copies into or out of it (reserve, map, set access ... unmap,
free the range), so when a model sleeps and its engines have let go,
`cuMemRelease` really returns the memory to the driver."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

from torpord.backends.base import Slab
from torpord.backends.cuda.device import Device, settle
from torpord.backends.cuda.memory import DeviceMemory, Live
from torpord.cuda.driver import check, context, cu

__all__ = ["Windows", "map_memory", "unmap"]


def map_memory(dev: Device, memory: DeviceMemory, peers: Sequence[int] = ()) -> tuple[int, int]:
    """(address, length) of the whole allocation mapped, readable and
    writable by the device and `peers` (ordinals)."""
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


def unmap(dev: Device, address: int, length: int) -> None:
    d = cu()
    context(dev.ordinal)
    try:
        check(d.cuMemUnmap(address, length), "cuMemUnmap")
    finally:
        check(d.cuMemAddressFree(address, length), "cuMemAddressFree")


class Windows:
    """The windows onto live device slabs, and those the read path keeps
    open from a layer's first chunk to its checksum."""

    def __init__(self, live: Live) -> None:
        self._live = live
        self._lock = threading.Lock()
        # Windows the read path keeps open: slab -> (address, length).
        self._kept: dict[Slab, tuple[int, int]] = {}

    @contextlib.contextmanager
    def window(self, slab: Slab, *, peers: Sequence[int] = ()) -> Iterator[int]:
        """Map a device slab into the daemon for the length of the block; yields
        its address. The whole allocation, at offset 0: the driver maps no
        part of one ("offset ... currently must be zero", cuMemMap). A window
        kept open for the read path (keep) serves instead: it holds no count
        of its users, so only that path's writes and the checksum that ends
        it may use it."""
        dev = self._live.device(slab.device)
        with self._lock:
            kept = self._kept.get(slab) if not peers else None
        if kept is not None:
            try:
                yield kept[0]
            except BaseException:
                settle(dev)
                raise
            return
        address, length = map_memory(*self._live.on_device(slab), peers)
        try:
            yield address
        except BaseException:
            settle(dev)
            raise
        finally:
            unmap(dev, address, length)

    def keep(self, slab: Slab) -> None:
        """Keep a device slab mapped until drop (or its free): the read path
        writes a layer in many chunks, and mapping (cuMemMap, cuMemSetAccess,
        cuMemUnmap may synchronise the device) once per layer instead of once
        per chunk keeps it off the copies' way."""
        with self._lock:
            if slab in self._kept:
                return
        dev, memory = self._live.on_device(slab)
        mapped = map_memory(dev, memory)
        with self._lock:
            if slab not in self._kept:
                self._kept[slab] = mapped
                return
        unmap(dev, *mapped)  # (another worker mapped it meanwhile)

    def drop(self, slab: Slab) -> None:
        """Unmap a window keep opened. Its users waited for their copies (and
        a failed one for its device's streams: window)."""
        with self._lock:
            kept = self._kept.pop(slab, None)
        if kept is not None:
            unmap(self._live.device(slab.device), *kept)
