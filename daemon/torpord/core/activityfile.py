"""The models' activity history in a file (`[policy] history`), across restarts.

What predicted preloads read (each model's uses per hour of the week, decayed
over weeks) only builds up over weeks, so it must outlive an upgrade, a crash
or a reboot. `HistoryFile` saves the `ActivityLog`'s records (last use, uses,
busy seconds, the weekly bins and the recent-window rings; never the open
uses, which belong to live engines and routers) and reads them back at start.

The file is written as ssh writes known_hosts: a new file (0600) in the same
directory, fsynced, renamed over the old one, so a crash leaves the old or
the new history, never half of one (a temporary file a crash left is
removed at the next start). Its directory is held to the disk
cache's rules (torpord.storage.cachefiles.CacheDir: ours, writable by no one
else, under parents only root or we can change), checked at start.

The file is read as hostile: through the bounded JSON reader (size, depth),
without following a symbolic link or blocking on a FIFO, and validated
strictly (types, finite non-negative numbers in bounds, 168 weekly bins,
model id syntax, at most MAX_SAVED models). A missing file starts the
history empty; one refused is logged (why, never its content), moved aside
to `<name>.bad` for whoever wants to look at it, and the history starts
empty: nothing of it is trusted, and it is not lost either.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

import structlog
from torpor.boundedjson import BoundedJSONError, loads

from torpord.core.activity import MAX_SAVED, ActivityLog
from torpord.core.registry import MODEL_ID
from torpord.policies.activity import HOURS_PER_WEEK, RING_SIZES, SavedActivity
from torpord.storage.atomicfile import write_atomic
from torpord.storage.cachefiles import CacheDir, printable

__all__ = [
    "FORMAT_VERSION",
    "MAX_BYTES",
    "SAVE_INTERVAL",
    "HistoryFile",
    "HistoryKeeper",
    "decode",
    "encode",
]

log = structlog.get_logger("torpord.core")

FORMAT_VERSION = 1
# Seconds between two saves (each only if a record changed since the last):
# a crash loses at most this much history; a clean stop loses none.
SAVE_INTERVAL = 300.0
# A full file (MAX_SAVED models, 168 bins of ~20 characters each) is ~5 MiB.
MAX_BYTES = 16 * 2**20
_MAX_DEPTH = 6  # the file's own nesting is 5: {models: {id: {rings: [[i, [..]]]}}}
_MAX_TIME = 1e11  # seconds since the epoch (the year 5138): past it, not a time
_MAX_COUNT = 2**53  # uses, ring counts: exact in a float, more than any real count
_MAX_BUSY = 1e15  # seconds of use() summed: far past any real node's
_KEYS = {"last_use", "uses", "busy_seconds", "weekly_hour", "weekly", "rings"}
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def encode(saved: dict[str, SavedActivity]) -> bytes:
    models = {
        model_id: {
            "last_use": s.last_use,
            "uses": s.uses,
            "busy_seconds": s.busy_seconds,
            "weekly_hour": s.weekly_hour,
            "weekly": list(s.weekly),
            "rings": [[index, list(counts)] for index, counts in s.rings],
        }
        for model_id, s in saved.items()
    }
    doc = {"version": FORMAT_VERSION, "models": models}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def decode(raw: bytes) -> dict[str, SavedActivity]:
    """The records in `raw`; ValueError saying what is wrong (and where, by
    position: never quoting the file) otherwise."""
    try:
        doc = loads(raw, max_bytes=MAX_BYTES, max_depth=_MAX_DEPTH)
    except BoundedJSONError as err:
        raise ValueError(str(err)) from None
    if not isinstance(doc, dict) or set(doc) != {"version", "models"}:
        raise ValueError('not an activity history (an object of "version" and "models")')
    if doc["version"] != FORMAT_VERSION:
        raise ValueError(f"not version {FORMAT_VERSION} of the activity history")
    models = doc["models"]
    if not isinstance(models, dict):
        raise ValueError('"models" is not an object')
    if len(models) > MAX_SAVED:
        raise ValueError(f"{len(models)} models, more than the {MAX_SAVED} allowed")
    return {
        model_id: _model(position, model_id, entry)
        for position, (model_id, entry) in enumerate(models.items())
    }


def _model(position: int, model_id: str, entry: Any) -> SavedActivity:
    where = f"model #{position}"
    if not MODEL_ID.fullmatch(model_id):
        raise ValueError(f"{where}: its id is not a model id")
    if not isinstance(entry, dict) or set(entry) != _KEYS:
        raise ValueError(f"{where}: not an object of {', '.join(sorted(_KEYS))}")
    weekly = entry["weekly"]
    if not isinstance(weekly, list) or len(weekly) != HOURS_PER_WEEK:
        raise ValueError(f"{where}: weekly is not a list of {HOURS_PER_WEEK} numbers")
    hour = entry["weekly_hour"]
    if hour is None and any(v != 0 for v in weekly):
        raise ValueError(f"{where}: weekly counts without the hour they are decayed to")
    rings = entry["rings"]
    if not isinstance(rings, list) or len(rings) != len(RING_SIZES):
        raise ValueError(f"{where}: rings is not a list of {len(RING_SIZES)} rings")
    return SavedActivity(
        last_use=_number(entry["last_use"], f"{where}: last_use", _MAX_TIME),
        uses=_count(entry["uses"], f"{where}: uses", _MAX_COUNT),
        busy_seconds=_number(entry["busy_seconds"], f"{where}: busy_seconds", _MAX_BUSY),
        weekly_hour=None
        if hour is None
        else _count(hour, f"{where}: weekly_hour", int(_MAX_TIME // 3600)),
        weekly=tuple(_number(v, f"{where}: weekly[{i}]", _MAX_COUNT) for i, v in enumerate(weekly)),
        rings=tuple(
            _ring(ring, size, f"{where}: rings[{i}]")
            for i, (ring, size) in enumerate(zip(rings, RING_SIZES, strict=True))
        ),
    )


def _ring(ring: Any, size: int, where: str) -> tuple[int | None, tuple[int, ...]]:
    if not isinstance(ring, list) or len(ring) != 2:
        raise ValueError(f"{where}: not a pair [newest bucket, counts]")
    index, counts = ring
    if not isinstance(counts, list) or len(counts) != size:
        raise ValueError(f"{where}: its counts are not a list of {size} counts")
    return (
        None if index is None else _count(index, f"{where}: newest bucket", int(_MAX_TIME)),
        tuple(_count(c, f"{where}: count {i}", _MAX_COUNT) for i, c in enumerate(counts)),
    )


def _number(value: Any, where: str, limit: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: not a number")
    if not (math.isfinite(value) and 0 <= value <= limit):
        raise ValueError(f"{where}: not a number between 0 and {limit:g}")
    return float(value)


def _count(value: Any, where: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: not a whole number")
    if not 0 <= value <= limit:
        raise ValueError(f"{where}: not between 0 and {limit}")
    return value


class HistoryFile:
    """The file at `path`; its directory is checked (and made, 0700, if
    missing) here: UnsafeCacheDir if others could change it."""

    def __init__(self, path: Path) -> None:
        self._dir = CacheDir(path.parent)
        self.path = path
        # False once a refused file could not be moved aside: it is left alone.
        self.writable = True

    def load(self) -> dict[str, SavedActivity]:
        """The saved records; {} when there is no file, or (logged) when it
        is refused. Removes what a crash in the middle of a save left."""
        self._remove_leftovers()
        try:
            raw = self._read()
        except FileNotFoundError:
            return {}
        except OSError as err:
            return self._refuse(err.strerror or str(err))
        try:
            return decode(raw)
        except ValueError as err:
            return self._refuse(str(err))

    def _remove_leftovers(self) -> None:
        name = re.compile(rf"\.{re.escape(self.path.name)}\.\d+\.[0-9a-f]{{8}}\.tmp")
        try:
            found = [entry for entry in os.scandir(self.path.parent) if name.fullmatch(entry.name)]
        except OSError:
            return
        for entry in found:
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)

    def _read(self) -> bytes:
        try:
            fd = os.open(self.path, _READ)
        except OSError as err:
            if err.errno == errno.ELOOP:  # (O_NOFOLLOW)
                raise OSError(err.errno, "it is a symbolic link") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(0, "it is not a regular file")
            if st.st_size > MAX_BYTES:
                raise OSError(0, f"it is {st.st_size} bytes, more than the {MAX_BYTES} allowed")
            chunks, left = [], MAX_BYTES + 1
            while left > 0:
                chunk = os.read(fd, min(left, 2**20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _refuse(self, why: str) -> dict[str, SavedActivity]:
        aside = self.path.with_name(self.path.name + ".bad")
        try:
            os.rename(self.path, aside)  # (moves the entry: never follows a link)
        except OSError as err:
            self.writable = False
            log.warning(
                "activity history refused: starting empty, and leaving it alone",
                path=printable(self.path),
                why=why,
                move_error=err.strerror,
            )
            return {}
        log.warning(
            "activity history refused: starting empty",
            path=printable(self.path),
            why=why,
            moved_to=printable(aside),
        )
        return {}

    def write(self, saved: dict[str, SavedActivity]) -> bool:
        """Replace the file with `saved` (blocking: on a worker thread);
        False (logged) if that failed, the old file left as it was."""
        if not self.writable:
            return False
        data = encode(saved)
        tmp = f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with self._dir.opened() as folder:
                write_atomic(folder, self.path.name, tmp, data)
        except OSError as err:
            log.warning(
                "cannot save the activity history",
                path=printable(self.path),
                error=err.strerror or str(err),
            )
            return False
        return True


class HistoryKeeper:
    """Restores `activity` from `file` at start, saves it every SAVE_INTERVAL
    seconds when it changed, and once more at `close` (the clean stop).

    Its own task rather than a step of the policy layer's housekeeping: the
    history is kept with the policy layer off too, and a save must never
    delay a round of decisions. Snapshots are taken on the event loop (a
    copy of each record's lists), encoded and written on a worker thread."""

    def __init__(self, file: HistoryFile, activity: ActivityLog) -> None:
        self._file = file
        self._activity = activity
        self._saved = activity.changes
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def restore(self) -> int:
        """Restore the saved records (at start); how many there were."""
        saved = self._file.load()
        self._activity.restore(saved)
        self._saved = self._activity.changes
        if saved:
            log.info("activity history restored", models=len(saved), path=str(self._file.path))
        return len(saved)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="activity history")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), SAVE_INTERVAL)
            try:
                await self.save()
            except Exception:  # (a bug in a save must not stop the daemon's shutdown)
                log.exception("cannot save the activity history")
            if self._stop.is_set():
                return

    async def save(self) -> bool:
        """Save now if anything changed since the last save; whether it did."""
        changes = self._activity.changes
        if changes == self._saved:
            return False
        saved = self._activity.saved()
        if not await asyncio.to_thread(self._file.write, saved):
            return False
        self._saved = changes
        return True

    async def close(self, timeout: float | None = None) -> bool:
        """The last save (a save in progress finishes first: never two at
        once), no report coming in any more. False when it did not finish
        within `timeout` seconds (a disk that does not answer): it is left to
        its thread, and what it leaves is removed at the next start."""
        self._stop.set()
        last = self._task if self._task is not None else asyncio.ensure_future(self.save())
        try:
            await asyncio.wait_for(last, timeout)
        except TimeoutError:
            log.error(
                "saving the activity history did not finish within the grace period;"
                " not waiting for it",
                path=printable(self._file.path),
            )
            return False
        return True
