"""A GPU as the backend holds it: its budget, its allocation granularity, two
streams (one per direction), its pinned staging buffers and its measured
transfer methods."""

from __future__ import annotations

import contextlib
import queue
from dataclasses import dataclass, field
from typing import Any

from torpord.backends.base import Budget
from torpord.backends.cuda.methods import TransferMethods
from torpord.cuda import driver
from torpord.cuda.driver import check, context, cu
from torpord.cuda.events import Event

__all__ = [
    "STAGING",
    "STAGING_BUFFERS",
    "Device",
    "Staging",
    "open_device",
    "release_device",
    "settle",
    "synchronize",
]

STAGING = 32 << 20  # bytes per pinned staging buffer of the read path
STAGING_BUFFERS = 4  # per device


@dataclass(eq=False)
class Staging:
    """A pinned buffer the read path copies through, and the event of the
    copy that last read it."""

    address: int
    size: int
    event: Event | None = None


@dataclass
class Device:
    uuid: str
    ordinal: int
    name: str
    budget: Budget
    granularity: int = 0
    h2d: Any = None  # CUstream
    d2h: Any = None
    staging: queue.Queue[Staging] = field(default_factory=queue.Queue)
    methods: TransferMethods = field(default_factory=TransferMethods)


def open_device(uuid: str, ordinal: int, capacity: float | int, opened: list[Device]) -> None:
    """The device, appended to `opened` as soon as it holds anything of the
    driver's (so release_device frees it with the rest on failure).
    `capacity`: a share of its total memory (a float), or bytes (an int)."""
    d = cu()
    context(ordinal)
    _, total = driver.mem_info(ordinal)
    budget = int(total * capacity) if isinstance(capacity, float) else capacity
    dev = check(d.cuDeviceGet(ordinal), "cuDeviceGet")
    raw = check(d.cuDeviceGetName(256, dev), "cuDeviceGetName")
    name = bytes(raw).split(b"\0", 1)[0].decode(errors="replace")
    device = Device(uuid, ordinal, name, Budget(f"device {uuid}", min(budget, total)))
    device.granularity = driver.granularity(ordinal)
    flags = d.CUstream_flags.CU_STREAM_NON_BLOCKING
    opened.append(device)
    device.h2d = check(d.cuStreamCreate(flags), "cuStreamCreate")
    device.d2h = check(d.cuStreamCreate(flags), "cuStreamCreate")
    for _ in range(STAGING_BUFFERS):
        address = check(d.cuMemHostAlloc(STAGING, d.CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc")
        device.staging.put(Staging(int(address), STAGING))


def release_device(dev: Device) -> None:
    """Free its staging buffers (once their copies completed) and streams."""
    d = cu()
    context(dev.ordinal)
    while not dev.staging.empty():
        staging = dev.staging.get_nowait()
        if staging.event is not None:
            staging.event.synchronize()
        check(d.cuMemFreeHost(staging.address), "cuMemFreeHost")
    for stream in (dev.h2d, dev.d2h):
        if stream is not None:
            check(d.cuStreamDestroy(stream), "cuStreamDestroy")


def synchronize(dev: Device) -> None:
    """Wait for everything queued on the device's streams."""
    context(dev.ordinal)
    check(cu().cuStreamSynchronize(dev.h2d), "cuStreamSynchronize")
    check(cu().cuStreamSynchronize(dev.d2h), "cuStreamSynchronize")


def settle(dev: Device) -> None:
    """Work queued into a window whose wait failed (an event not made, a
    wait cut short) must not outlive the mapping: wait for the streams,
    whatever happens."""
    with contextlib.suppress(Exception):
        context(dev.ordinal)
        for stream in (dev.h2d, dev.d2h):
            cu().cuStreamSynchronize(stream)
