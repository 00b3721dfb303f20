"""The io workers a move runs its blocking steps on, and how they stop.

A step on a worker may be writing into a slab the event loop is about to
free, so a cancelled caller still waits for it (`settle`); on shutdown,
once the grace period is over, `stopping` makes a worker in the middle of a
big layer stop at its next piece.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from torpord.errors import Aborted

__all__ = ["Workers", "settle"]

T = TypeVar("T")


async def settle(awaitable: Awaitable[T], on_cancel: Callable[[], object] | None = None) -> T:
    """Await `awaitable` to its end even if the caller is cancelled meanwhile
    (however often); then raise the cancellation. For work that must not be
    abandoned halfway: a copy into a slab about to be freed, engines letting go
    of a slab before it is freed. `on_cancel` is called at the first
    cancellation (to ask the work to stop early, where it can)."""
    future = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if future.cancelled():  # the work itself was cancelled, not just us
            raise
        if on_cancel is not None:
            on_cancel()
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                continue
            except BaseException:
                break
        raise


class Workers:
    def __init__(self, executor: concurrent.futures.Executor) -> None:
        self.executor = executor
        # Set on shutdown once the grace period is over: a worker in the middle
        # of a big layer stops at its next piece instead of finishing the layer.
        self.stopping = threading.Event()

    async def blocking(
        self, fn: Callable[..., T], *args: object, on_cancel: Callable[[], object] | None = None
    ) -> T:
        """Run fn on a worker thread. If the caller is cancelled, still wait for
        the thread to finish: it may be writing into a slab we are about to free
        (`on_cancel` may ask it to finish early)."""
        loop = asyncio.get_running_loop()
        return await settle(
            loop.run_in_executor(self.executor, functools.partial(fn, *args)), on_cancel
        )

    def check_stopping(self) -> None:
        if self.stopping.is_set():
            raise Aborted("the daemon is shutting down", reason="SHUTTING_DOWN")
