"""What each live slab is: a VMM allocation on a device (created, released,
exported as a POSIX fd) or a range of the pinned pool; and the registry of
live slabs the other parts look them up in."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torpord.backends.base import Slab
from torpord.backends.cuda.device import Device
from torpord.cuda import driver
from torpord.cuda.driver import CudaError, allocation_prop, check, context, cu
from torpord.errors import InvalidArgument, ResourceExhausted

__all__ = ["DeviceMemory", "HostRange", "Live", "create", "export", "release"]


@dataclass(eq=False)
class DeviceMemory:
    handle: Any  # CUmemGenericAllocationHandle
    length: int  # padded to the granularity


@dataclass(eq=False)
class HostRange:
    offset: int


def create(dev: Device, length: int) -> DeviceMemory:
    """`length` bytes (a multiple of the granularity) of the device's memory;
    OUT_OF_MEMORY naming what the driver has when it has too little."""
    context(dev.ordinal)
    try:
        handle = check(cu().cuMemCreate(length, allocation_prop(dev.ordinal), 0), "cuMemCreate")
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
    return DeviceMemory(handle, length)


def release(dev: Device, memory: DeviceMemory) -> None:
    """The memory returns to the driver once no process maps it."""
    context(dev.ordinal)
    check(cu().cuMemRelease(memory.handle), "cuMemRelease")


def export(dev: Device, memory: DeviceMemory) -> int:
    """A new fd of the allocation (close-on-exec), for an engine to map."""
    d = cu()
    context(dev.ordinal)
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


class Live:
    """The backend's devices and its live slabs' memory."""

    def __init__(self, devices: Sequence[Device]) -> None:
        self.devices = devices
        self._slabs: dict[Slab, DeviceMemory | HostRange] = {}
        self._lock = threading.Lock()

    def device(self, uuid: str | None) -> Device:
        for dev in self.devices:
            if dev.uuid == uuid:
                return dev
        raise InvalidArgument(f"unknown device {uuid!r}", reason="UNKNOWN_DEVICE")

    def add(self, slab: Slab, memory: DeviceMemory | HostRange) -> None:
        with self._lock:
            self._slabs[slab] = memory

    def pop(self, slab: Slab) -> DeviceMemory | HostRange | None:
        with self._lock:
            return self._slabs.pop(slab, None)

    def slabs(self) -> list[Slab]:
        with self._lock:
            return list(self._slabs)

    def memory(self, slab: Slab) -> DeviceMemory | HostRange:
        with self._lock:
            memory = self._slabs.get(slab)
        if memory is None:
            raise RuntimeError(f"slab {slab.id} ({slab.owner}) is not live")
        return memory

    def on_device(self, slab: Slab) -> tuple[Device, DeviceMemory]:
        """A device slab's device and allocation."""
        memory = self.memory(slab)
        assert isinstance(memory, DeviceMemory)
        return self.device(slab.device), memory

    def host_range(self, slab: Slab) -> HostRange:
        memory = self.memory(slab)
        assert isinstance(memory, HostRange)
        return memory
