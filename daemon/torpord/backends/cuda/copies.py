"""Copies between slabs: host to device, device to host, and device to
device (directly where P2P allows, else through pinned staging), on two
streams per device (one per direction), in pieces with an event after each,
so progress is reported as bytes land and a pinned range is reused only
after its copies completed."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import Any

from torpord.backends.base import Slab
from torpord.backends.cuda.device import Device
from torpord.backends.cuda.memory import Live
from torpord.backends.cuda.windows import Windows
from torpord.cuda.driver import check, context, cu
from torpord.cuda.events import Event
from torpord.cuda.pinned import PinnedPool
from torpord.types import Tier

__all__ = ["PIECE", "Copies"]

PIECE = 64 << 20  # bytes per copy piece (one event each)


class Copies:
    def __init__(self, live: Live, windows: Windows, pool: PinnedPool) -> None:
        self._live = live
        self._windows = windows
        self._pool = pool

    def host_address(self, slab: Slab) -> int:
        return self._pool.address + self._live.host_range(slab).offset

    def copy(self, src: Slab, dst: Slab, report: Callable[[int], None]) -> None:
        """src's bytes into dst (of the same size), each piece reported as it
        lands."""
        window, device = self._windows.window, self._live.device
        if src.tier is Tier.HOST and dst.tier is Tier.HOST:
            ctypes.memmove(self.host_address(dst), self.host_address(src), src.size)
            report(src.size)
        elif src.tier is Tier.HOST:
            dev = device(dst.device)
            with window(dst) as address:
                self._pieces(dev, dev.h2d, "HtoD", address, self.host_address(src), src, report)
        elif dst.tier is Tier.HOST:
            dev = device(src.device)
            with window(src) as address:
                self._pieces(dev, dev.d2h, "DtoH", self.host_address(dst), address, dst, report)
        else:
            dev, other = device(dst.device), device(src.device)
            if other is not dev and not peers(other, dev):
                self._through_host(src, dst, report)
                return
            # The copy runs on dst's device: src's memory must be open to it.
            ordinals = [dev.ordinal] if other is not dev else []
            with window(dst) as to, window(src, peers=ordinals) as from_:
                self._pieces(dev, dev.h2d, "DtoD", to, from_, dst, report)

    def _through_host(self, src: Slab, dst: Slab, report: Callable[[int], None]) -> None:
        """A copy between GPUs that can't reach each other: through dst's
        pinned staging buffers, one piece at a time."""
        sdev, ddev = self._live.device(src.device), self._live.device(dst.device)
        staging = ddev.staging.get()
        try:
            if staging.event is not None:
                staging.event.synchronize()
                staging.event = None
            with self._windows.window(src) as from_, self._windows.window(dst) as to:
                d = cu()
                for at in range(0, src.size, staging.size):
                    n = min(staging.size, src.size - at)
                    context(sdev.ordinal)
                    check(
                        d.cuMemcpyDtoHAsync(staging.address, from_ + at, n, sdev.d2h),
                        "cuMemcpyDtoHAsync",
                    )
                    Event(sdev.ordinal, sdev.d2h).synchronize()
                    context(ddev.ordinal)
                    check(
                        d.cuMemcpyHtoDAsync(to + at, staging.address, n, ddev.h2d),
                        "cuMemcpyHtoDAsync",
                    )
                    Event(ddev.ordinal, ddev.h2d).synchronize()
                    report(n)
        finally:
            ddev.staging.put(staging)

    def _pieces(
        self,
        dev: Device,
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
        spans: Sequence[tuple[int, int]]
        if kind == "DtoD":
            spans = [(o, min(PIECE, host_slab.size - o)) for o in range(0, host_slab.size, PIECE)]
        else:
            base = self._live.host_range(host_slab)
            spans = [
                (at - base.offset, n)
                for at, n in self._pool.pieces(base.offset, host_slab.size, PIECE)
            ]
        events = []
        failure: BaseException | None = None
        try:
            for offset, n in spans:
                check(call(dst + offset, src + offset, n, stream), f"cuMemcpy{kind}Async")
                events.append((Event(dev.ordinal, stream), n))
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


def peers(src: Device, dst: Device) -> bool:
    """Whether dst's device can read src's memory directly (P2P)."""
    d = cu()
    ok = check(d.cuDeviceCanAccessPeer(dst.ordinal, src.ordinal), "cuDeviceCanAccessPeer")
    return bool(ok)
