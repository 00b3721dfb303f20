"""Shutdown ends within its grace period, even when a worker never returns."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

from torpor.testing import make_checkpoint
from torpord.backends.base import Slab
from torpord.backends.host import HostBackend
from torpord.core.manager import ManagerSettings, ModelManager
from torpord.types import ModelState

MiB = 2**20


class StuckDevice(HostBackend):
    """A device whose copies hang until `release` is set (a wedged DMA, a
    driver that never answers)."""

    def __init__(self) -> None:
        super().__init__(devices=1, device_capacity=64 * MiB, host_capacity=64 * MiB)
        self.release = threading.Event()
        self.copying = threading.Event()

    def copy(self, src: Slab, dst: Slab, on_bytes: Callable[[int], None] | None = None) -> None:
        self.copying.set()
        self.release.wait()
        super().copy(src, dst, on_bytes)


async def test_close_gives_up_on_a_stuck_worker_within_the_grace_period(tmp_path: Path) -> None:
    backend = StuckDevice()
    manager = ModelManager(backend, ManagerSettings(allowed_roots=(tmp_path.resolve(),)))
    ckpt = make_checkpoint(tmp_path / "m", layers=2, hidden=64)
    try:
        await manager.load("m", str(ckpt))
        await manager.sleep("m", 1, wait=False)
        await asyncio.to_thread(backend.copying.wait, 10)
        used = backend.host_pool().used
        # (wait_for: a close that waits for the stuck copy would hang the test.)
        clean = await asyncio.wait_for(manager.close(0.3, rollback=0.2), 30)
        # It gave up (the copy is still running), and freed nothing under it:
        # the slab being written stays allocated until the process exits.
        assert clean is False
        assert backend.host_pool().used == used
        assert manager.find("m") is not None and manager.find("m").state is ModelState.SLEEPING
    finally:
        backend.release.set()
        await asyncio.sleep(0.1)
        backend.close()
