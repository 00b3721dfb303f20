"""Scrubbing: the copies of models' layers that are not on a device (host
slabs, disk cache entries) checked against their checksums in the
background, so a copy that rotted is found before a wake would serve it.

The scrubber never competes with transitions and never reads memory that
is being freed:
- it reads at most `rate` bytes a second (a token bucket), one bounded piece
  at a time, on a thread of its own, never on the event loop;
- it checks only models at rest (ACTIVE, OFFLOADED, ASLEEP) and not in a
  transition. Before each piece it checks, on the event loop, that the model
  is still idle and the copy still the layer's; a transition that begins
  waits for the piece being read (`stand_aside`, called by the runner before
  a transition changes anything), then the check is abandoned. So a wake
  waits for one piece at most, and every slab a transition frees is freed
  after the scrubber has let go of it.
The checksum (torpord.storage.checksum) is one digest per 1 MiB chunk,
combined at the end, so pieces of whole chunks hash to the same result.

Which copies there are and when each is due (a new copy within seconds,
then each `interval`) is in core/scrubplan.py; what a corrupt copy does to
its model is in core/corrupt.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog

from torpord.backends.base import Backend, Slab
from torpord.core.corrupt import disk_copy_corrupt, host_copy_corrupt, suspected
from torpord.core.events import EventBus, EventType
from torpord.core.model import Model
from torpord.core.mover import Mover
from torpord.core.registry import Registry
from torpord.core.scrubplan import Copy, Key, Schedule, copies
from torpord.core.scrubread import Corrupt, hash_file, hash_slab, open_entry
from torpord.core.settings import ManagerSettings
from torpord.core.tokenbucket import TokenBucket
from torpord.core.workers import settle
from torpord.storage.checksum import CHUNK, combine
from torpord.storage.diskcache import DiskCache
from torpord.types import ModelState, Tier

__all__ = ["PIECE", "Scrubber", "TokenBucket", "make_scrubber"]

log = structlog.get_logger("torpord.scrub")

PIECE = 8 * CHUNK  # bytes read at once: what a transition may have to wait for
POLL = 1.0  # seconds between two walks when nothing is due sooner
T = TypeVar("T")
_AT_REST = frozenset({ModelState.ACTIVE, ModelState.OFFLOADED, ModelState.ASLEEP})


class _Abandoned(Exception):
    """The copy changed or its model began a transition: checked some other time."""


class Scrubber:
    def __init__(
        self,
        backend: Backend,
        registry: Registry,
        bus: EventBus,
        disk: Callable[[], DiskCache | None],
        free: Callable[[Sequence[Slab]], None],
        *,
        rate: int,
        interval: float,
        suspect: dict[int, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`free` frees slabs (blocking); `suspect` gets the host slabs found
        corrupt but taken by a transition first (id -> what was found: the
        mover verifies copies from them); `clock` and `sleep` pace it."""
        self._backend, self._registry, self._bus = backend, registry, bus
        self._disk, self._free = disk, free
        self.rate, self.interval = rate, interval
        self._clock, self._sleep = clock, sleep
        self._suspect = suspect if suspect is not None else {}
        self.bucket = TokenBucket(rate, PIECE, clock)  # (bursts of one piece)
        self.checked_bytes: dict[Tier, int] = {Tier.HOST: 0, Tier.DISK: 0}
        self.corrupt: dict[Tier, int] = {Tier.HOST: 0, Tier.DISK: 0}
        self.schedule = Schedule(interval, clock)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="torpord-scrub")
        self._task: asyncio.Task[None] | None = None
        self._current: Copy | None = None
        self._reading: asyncio.Future[Any] | None = None  # the piece being read
        self._freeing: set[asyncio.Future[None]] = set()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scrubber")
        log.info("scrubbing copies", rate=self.rate, interval=self.interval)

    async def stop(self, timeout: float | None = None) -> bool:
        """Stop, once the piece being read is done and the slabs of a corrupt
        copy are freed: nothing of the scrubber's touches memory after this.
        False if that took longer than `timeout` (a disk read that does not
        return: its thread is left to the process's exit)."""
        pending: set[asyncio.Future[Any]] = set(self._freeing)
        if self._task is not None:
            self._task.cancel()
            pending.add(self._task)
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            if late:
                log.error("scrub: a check did not stop in time; left to the process's exit")
                self._pool.shutdown(wait=False)
                return False
        self._pool.shutdown(wait=True)
        return True

    async def stand_aside(self, model: Model) -> None:
        """Before a transition of `model` changes anything: wait for the piece
        being read of its copy, if one is (the check is abandoned after it)."""
        reading = self._reading
        current = self._current
        if reading is not None and current is not None and current.model is model:
            await asyncio.wait([reading])

    async def _run(self) -> None:
        while True:
            try:
                wait = await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # (never the daemon's end: try again later)
                log.exception("scrubbing failed; trying again later")
                wait = POLL
            await self._sleep(wait)

    # -- the walk ------------------------------------------------------------

    async def sweep(self) -> float:
        """Check the copies that are due, in the schedule's order (walking
        them again each POLL seconds: a copy made meanwhile may go first);
        the seconds until the next is due (a due copy it could not check,
        its model busy or not at rest: POLL)."""
        later: set[Key] = set()  # (due, but not now)
        done: set[Key] = set()  # (checked in this sweep: once a sweep, even at interval 0)
        while due := self._due(later | done):
            walked = self._clock()
            for copy in due:
                if not self._still(copy):  # (its model is in a transition: later)
                    later.add(copy.key)
                elif copy.slab is not None and self._suspected(copy):
                    # (found before: a host copy at rest stays as it was)
                    self._verdict(copy, self._suspect[copy.slab.id], 0)
                    done.add(copy.key)
                else:
                    try:
                        await self.check(copy)
                        done.add(copy.key)
                    except _Abandoned:
                        later.add(copy.key)
                if self._clock() - walked >= POLL:
                    break
        return self.schedule.wait(later, POLL)

    def _due(self, skip: set[Key]) -> list[Copy]:
        """The copies due now and not in `skip`, the first to check first: host
        copies found corrupt before (no reading), then the schedule's order."""
        walked = list(copies(self._registry, self._disk()))
        self.schedule.track({copy.key for copy in walked})
        live = {c.slab.id for c in walked if c.slab is not None}
        for gone in [slab_id for slab_id in self._suspect if slab_id not in live]:
            del self._suspect[gone]
        now = self._clock()
        due = [
            copy
            for copy in walked
            if copy.key not in skip
            and (self._suspected(copy) or self.schedule.due(copy.key) <= now)
        ]
        due.sort(key=lambda copy: (not self._suspected(copy), self.schedule.rank(copy.key)))
        return due

    def _suspected(self, copy: Copy) -> bool:
        return copy.slab is not None and copy.slab.id in self._suspect

    def _still(self, copy: Copy) -> bool:
        """Whether `copy` is still its layer's, its model idle and at rest (an
        entry no model used: still in the cache, and still used by none)."""
        model, layer, disk = copy.model, copy.layer, self._disk()
        if model is None or layer is None:
            entry = copy.entry
            return (
                entry is not None
                and disk is not None
                and disk.get(entry.key) is entry
                and entry.key not in self._registry.disk_keys()
            )
        if self._registry.find(model.model_id) is not model:
            return False
        if model.busy or model.state not in _AT_REST:
            return False
        if copy.slab is not None:
            return layer.slab is copy.slab and not copy.slab.freed
        entry = copy.entry
        return (
            entry is not None
            and layer.disk is entry
            and disk is not None
            and disk.get(entry.key) is entry
        )

    # -- one copy ------------------------------------------------------------

    async def check(self, copy: Copy) -> None:
        """Read `copy` piece by piece at the rate, and act if it is corrupt
        (_Abandoned if it changed or its model began a transition meanwhile)."""
        expected = copy.expected
        self._current = copy
        fd: int | None = None
        disk = self._disk()
        done = 0  # (bytes read: what checked_bytes counts)
        try:
            if copy.entry is not None:
                assert disk is not None  # (_still says so)
                fd = await self._piece(copy, open_entry, disk, copy.entry, undo=_close)
                if fd is None:  # (another file took its place: a newer copy)
                    raise _Abandoned
            digests: list[int] = []
            for at in range(0, copy.size, PIECE):
                n = min(PIECE, copy.size - at)
                if (wait := self.bucket.take(n)) > 0:
                    await self._sleep(wait)
                if fd is None:
                    digests += await self._piece(copy, hash_slab, self._backend, copy.slab, at, n)
                else:
                    assert disk is not None
                    digests += await self._piece(copy, hash_file, disk.io, fd, copy.size, at, n)
                done += n
            actual = combine(digests)
            problem = None if actual == expected else f"checksum {actual}, expected {expected}"
        except Corrupt as err:
            problem = str(err)
        finally:
            self._current = None
            if fd is not None:
                os.close(fd)
        if not self._still(copy):  # (a transition began: the model is its now)
            if problem is not None:
                if copy.slab is not None:  # (counted now: the rollback may refuse it first)
                    self.corrupt[Tier.HOST] += suspected(self._suspect, copy.slab.id, problem)
                log.warning(
                    "scrub: a copy does not match its checksum, but its model's transition"
                    " began meanwhile: not acted on yet (any copy from it is verified; it is"
                    " refused once its model is at rest, or a disk copy checked again)",
                    problem=problem,
                    **copy.where(),
                )
            raise _Abandoned  # (and checked again at the next walk)
        self._verdict(copy, problem, done)

    def _verdict(self, copy: Copy, problem: str | None, done: int) -> None:
        """`copy`, its model at rest, was checked (`done` bytes read now)."""
        self.schedule.checked(copy.key)
        self.checked_bytes[copy.tier] += done
        if problem is not None:  # (a copy left to a transition was counted when found)
            self.corrupt[copy.tier] += copy.slab is None or copy.slab.id not in self._suspect
            message = "scrub: a copy does not match its checksum; it is refused"
            log.warning(message, problem=problem, **copy.where())
            self._refuse(copy, problem)

    def _refuse(self, copy: Copy, problem: str) -> None:
        """What a corrupt copy does (core/corrupt.py), and who hears of it."""
        if copy.slab is not None:
            assert copy.model is not None and copy.layer is not None
            self._suspect.pop(copy.slab.id, None)
            self._free_later(host_copy_corrupt(copy.model, copy.layer))
            changed = [copy.model]
        else:
            disk = self._disk()
            assert disk is not None and copy.entry is not None
            disk.remove(copy.entry)
            changed = disk_copy_corrupt(list(self._registry.models.values()), copy.entry, problem)
        for model in changed:
            self._bus.publish(EventType.CHANGED, model.snapshot())

    def _free_later(self, slabs: Sequence[Slab]) -> None:
        """Free `slabs` on the scrubber's thread (gigabytes take a while)."""
        freeing = asyncio.get_running_loop().run_in_executor(self._pool, self._free, slabs)
        self._freeing.add(freeing)
        freeing.add_done_callback(self._freeing.discard)
        freeing.add_done_callback(_log_failure)

    async def _piece(
        self,
        copy: Copy,
        fn: Callable[..., T],
        *args: object,
        undo: Callable[[T], object] | None = None,
    ) -> T:
        """fn(*args) on the scrubber's thread, if `copy` is still to be read;
        `undo` undoes what it returned if the scrubber is stopped meanwhile."""
        if not self._still(copy):
            raise _Abandoned
        reading = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        self._reading = reading
        try:
            # (Even when stopped, it waits for the thread to let go first.)
            return await settle(reading)
        except asyncio.CancelledError:
            if undo is not None and not reading.cancelled() and reading.exception() is None:
                undo(reading.result())  # (an fd no one else will close)
            raise
        finally:
            self._reading = None


def make_scrubber(
    settings: ManagerSettings, backend: Backend, registry: Registry, bus: EventBus, mover: Mover
) -> Scrubber | None:
    """The manager's scrubber; None when `[scrub] rate` is 0."""
    if not settings.scrub_rate:
        return None
    return Scrubber(
        backend,
        registry,
        bus,
        lambda: mover.disk,
        lambda slabs: mover.free_all(slabs, False),
        rate=settings.scrub_rate,
        interval=settings.scrub_interval,
        suspect=mover.suspect,
    )


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.error("scrub: freeing a corrupt host copy failed", error=str(exc))
