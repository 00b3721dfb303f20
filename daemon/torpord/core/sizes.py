"""The sizes of catalogue entries: what policies plan room for before a Load.

An entry's size is what a Load of its source would allocate: the
checkpoint's header(s) read and checked as a Load reads them
(storage/checkpoint.py, under the allowed roots) and planned into layers
with the daemon's patterns and alignment, on a worker thread. It is kept
on the entry with the identity of what it was read from (each file's
device, inode, size and mtime, and the source's own), and read again when
that changes: every CHECK_INTERVAL seconds the housekeeping loop looks at
the files (a stat each) and reads the changed ones again.

RegisterModel reads it before the entry exists, so a source a Load would
refuse is refused with the Load's own reasons (SOURCE_NOT_FOUND,
INVALID_CHECKPOINT, ...). A config entry whose source can't be read at
start, or one whose source has gone or gone bad since, is kept with no
size: policies plan no room for it (housekeeping leaves it alone; an
Acquire still loads it, and its Load makes room when it finds the device
full). It is read again when its source looks changed (it appears, say)
or after a back-off (RETRY doubling up to MAX_RETRY); the failure is
logged when it first happens and when its reason changes, not at every
try.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import structlog

from torpord.core.catalogue import Catalogue, Size
from torpord.core.registry import plan_source
from torpord.core.settings import ManagerSettings
from torpord.errors import TorporError
from torpord.storage.safetensors import INDEX_FILE
from torpord.storage.sources import resolve_source

__all__ = ["CHECK_INTERVAL", "MAX_RETRY", "RETRY", "Sizes", "changed", "look", "measure"]

log = structlog.get_logger("torpord.catalogue")

CHECK_INTERVAL = 10.0  # seconds between two looks at the sources of sized entries
RETRY = 10.0  # seconds before an unreadable source is read again (doubling)
MAX_RETRY = 600.0

Identity = tuple[tuple[str, tuple[int, int, int, int] | None], ...]


def _look(paths: Sequence[str]) -> Identity:
    """Each path's (device, inode, size, mtime_ns), None where it is missing."""
    found: list[tuple[str, tuple[int, int, int, int] | None]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            found.append((path, None))
        else:
            found.append((path, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)))
    return tuple(found)


def measure(source: str, settings: ManagerSettings) -> Size:
    """The size of `source` as a Load would plan it (blocking: a worker
    thread's); a Load's errors for a source it would refuse."""
    paths = _paths(source, settings)
    # Looked at before reading: a change during the read shows at the next look.
    around = _look(paths)
    checkpoint, plans = plan_source(
        paths[0], settings.allowed_roots, settings.patterns, settings.alignment
    )
    files = tuple((f.path, (f.device, f.inode, f.size, f.mtime_ns)) for f in checkpoint.files)
    return Size(tuple((p.name, p.size) for p in plans), around + files)


def changed(size: Size) -> bool:
    """Whether what `size` was read from looks different now (blocking)."""
    return _look([path for path, _ in size.identity]) != size.identity


@dataclass
class _Failing:
    tries: int
    due: float  # loop time of the next try
    reason: str
    seen: Identity  # the source as it looked when it failed


def _paths(source: str, settings: ManagerSettings) -> list[str]:
    """What a source's look is taken of: the source as the caller named it
    (followed: a symlink re-pointed to another checkpoint, the usual
    "current" deploy, shows as a different inode), the file or directory
    it resolved to, and its index if any."""
    path = resolve_source(source, settings.allowed_roots)
    return [source, path, os.path.join(path, INDEX_FILE)]


def look(source: str, settings: ManagerSettings) -> Identity:
    """How `source` looks now (blocking)."""
    try:
        return _look(_paths(source, settings))
    except TorporError:
        return ()


class Sizes:
    """Reads and refreshes the catalogue's sizes (see the module's docstring)."""

    def __init__(
        self,
        catalogue: Catalogue,
        settings: ManagerSettings,
        executor: concurrent.futures.Executor,
    ) -> None:
        self._catalogue = catalogue
        self._settings = settings
        self._executor = executor
        self._failing: dict[str, _Failing] = {}  # model id -> its source's failures
        self._next = 0.0  # loop time of the next refresh
        self._task: asyncio.Task[None] | None = None

    async def measure(self, source: str) -> Size:
        """`source`'s size, read on a worker (a Load's errors)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, measure, source, self._settings)

    def tick(self) -> None:
        """Start a refresh every CHECK_INTERVAL seconds, and at once when
        an entry has no size yet and has not failed (the housekeeping loop
        calls this each round); one runs at a time."""
        if self._task is not None and not self._task.done():
            return
        now = asyncio.get_running_loop().time()
        new = any(
            e.size is None and e.model_id not in self._failing for e in self._catalogue.entries()
        )
        if now >= self._next or new:
            self._next = now + CHECK_INTERVAL
            self._task = asyncio.create_task(self.refresh(), name="catalogue sizes")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    async def refresh(self) -> None:
        """Read again the sizes whose source looks changed, and those missing
        (each when its back-off is over or its source looks changed)."""
        loop = asyncio.get_running_loop()
        settings, entries = self._settings, self._catalogue.entries()
        for gone in self._failing.keys() - {e.model_id for e in entries}:
            del self._failing[gone]
        sized = {e.model_id: e.size for e in entries if e.size is not None}
        moved = await loop.run_in_executor(  # (one trip to a worker for them all)
            self._executor, lambda: {i for i, size in sized.items() if changed(size)}
        )
        for entry in entries:
            if entry.model_id in sized:  # (read since it failed: by a RegisterModel)
                self._failing.pop(entry.model_id, None)
                if entry.model_id not in moved:
                    continue
            failing = self._failing.get(entry.model_id)
            seen = await loop.run_in_executor(self._executor, look, entry.source, settings)
            if failing is not None and failing.due > loop.time() and seen == failing.seen:
                continue
            try:
                size = await self.measure(entry.source)
            except TorporError as err:
                size = None
                self._failed(entry.model_id, entry.source, err, loop.time(), seen)
            else:
                if self._failing.pop(entry.model_id, None) is not None:
                    log.info(
                        "a catalogue entry's source can be read again", model_id=entry.model_id
                    )
            current = self._catalogue.get(entry.model_id)
            if current is not None and current.source == entry.source:
                self._catalogue.put(replace(current, size=size))

    def _failed(
        self, model_id: str, source: str, err: TorporError, now: float, seen: Identity
    ) -> None:
        old = self._failing.get(model_id)
        tries = 1 if old is None else old.tries + 1
        wait = min(MAX_RETRY, RETRY * 2 ** (tries - 1))
        self._failing[model_id] = _Failing(tries, now + wait, err.reason, seen)
        if old is None or old.reason != err.reason:
            log.warning(
                "a catalogue entry's source can't be read: its size is unknown, so"
                " policies plan no room for it until it can",
                model_id=model_id,
                source=source,
                reason=err.reason,
                error=err.message,
                retry_in=wait,
            )
