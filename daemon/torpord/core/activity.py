"""The daemon's record of each model's use: an `Activity` per model id.

Engines report their `use()` blocks through their attachment (one reporter
per attachment), routers through ReportActivity (one reporter per name), and
each Acquire counts as a use. An Acquire also holds its model in use, under
reporters of its own: while it runs (`ACQUIRING`), and once the model is
ready for a while (`HOLDING`, config `[policy] acquire_hold`), so that the
request it was made ready for finds it there: policies evict and sleep no
model in use. The hold ends early once another reporter reports a use of
the model, open or ended (the engine's use() or the router took over).
A model's record outlives an unload while its id is still known
(registered in the catalogue), so a model that comes back keeps its
history; it goes when its id is neither loaded nor registered.
With `[policy] history` set, the records are saved to a file and restored at
the next start (core/activityfile.py): a restored record waits, bounded, for
its id to be loaded or registered again.
The clock is the wall clock (`time.time`): activity is compared with windows
of the week and shown as timestamps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from torpord.errors import InvalidArgument, NotFound
from torpord.policies.activity import Activity, SavedActivity
from torpord.policies.view import ActivitySummary

__all__ = [
    "ACQUIRING",
    "HOLDING",
    "MAX_BUSY_SECONDS",
    "MAX_IN_USE",
    "MAX_REPORTER",
    "MAX_SAVED",
    "MAX_USES",
    "OPEN_USE_LEASE",
    "ActivityLog",
]

# Bounds of one report: past them a report is a bug or an attack, not a
# count (a day of a thousand requests a second is 8.64e7 uses).
MAX_USES = 10**9
MAX_IN_USE = 10**6
MAX_BUSY_SECONDS = 10**9  # about 31 years of use() time summed over blocks
MAX_REPORTER = 128  # characters of a reporter's name
# Seconds a router's open uses (ReportActivity in_use) count without a
# newer report from it: one that vanished stops holding its models in use
# (policies evict and sleep no model in use). Routers report at least every
# half of it (proto/torpor/v1/models.proto says so). Engines' attachments
# need none: their uses end when the attachment does.
OPEN_USE_LEASE = 60.0
# The reporters of Acquire's uses and holds (core/acquire.py).
ACQUIRING = "acquire"
HOLDING = "acquire hold"
_SWEEP_AT = 1024  # records past which those of ids no longer known are swept
# Records saved across restarts at most (the most recently used first): a
# few KiB each in the file.
MAX_SAVED = 1024


class ActivityLog:
    """Each known model id's `Activity` (on the event loop).

    `known(model_id)` says whether an id is loaded or registered (the
    manager's `known`): reports about other ids are NOT_FOUND, and a record
    whose id stops being known is dropped (`release`), so the number of
    records never exceeds the number of ids the daemon knows."""

    def __init__(
        self, known: Callable[[str], bool], clock: Callable[[], float] = time.time
    ) -> None:
        self._known = known
        self._clock = clock
        self._records: dict[str, Activity] = {}
        self._sweep_at = _SWEEP_AT
        # Restored records of ids not known (yet): taken when they are.
        self._restored: dict[str, Activity] = {}
        # Counts what may have changed a record: a save only when it moved.
        self.changes = 0

    def of(self, model_id: str) -> Activity:
        """The record of `model_id`: its restored one, or created empty the
        first time."""
        record = self._records.get(model_id)
        if record is None:
            if len(self._records) >= self._sweep_at:
                self._sweep()
            record = self._restored.pop(model_id, None)
            if record is None:
                record = Activity()
            self._records[model_id] = record
        return record

    def restore(self, saved: dict[str, SavedActivity]) -> None:
        """Take the records of a previous run (at start, before any report):
        those of ids known now at once, the others when their id is."""
        now = self._clock()
        for model_id, state in list(saved.items())[:MAX_SAVED]:
            if self._known(model_id):
                record = self.of(model_id)  # (a loaded model's is shared with it)
            else:
                record = self._restored[model_id] = Activity()
            record.restore(state, now)

    def saved(self) -> dict[str, SavedActivity]:
        """What to save: the MAX_SAVED most recently used records, restored
        ones waiting for their id included (a copy: on the event loop)."""
        records = [*self._records.items(), *self._restored.items()]
        states = [(model_id, record.saved()) for model_id, record in records]
        states.sort(key=lambda item: item[1].last_use, reverse=True)
        return dict(states[:MAX_SAVED])

    def _sweep(self) -> None:
        # A safety net behind `release` (an id dropped without it): amortised,
        # as the next sweep waits until the records have doubled.
        for model_id in [m for m in self._records if not self._known(m)]:
            del self._records[model_id]
        self._sweep_at = max(_SWEEP_AT, 2 * len(self._records))

    def summary(self, model_id: str) -> ActivitySummary:
        record = self._records.get(model_id)
        if record is None and model_id in self._restored and self._known(model_id):
            record = self.of(model_id)  # (registered since the start)
        return record.summary(self._clock()) if record is not None else ActivitySummary()

    def record(
        self,
        model_id: str,
        reporter: str,
        uses: int,
        busy_seconds: float,
        in_use: int,
        *,
        lease: float | None = None,
    ) -> None:
        """A report about `model_id` (validated: INVALID_ARGUMENT reason
        INVALID_ACTIVITY naming the field; NOT_FOUND for an id the daemon
        doesn't know). A refused report changes nothing. `lease`: seconds
        its open uses count unless `reporter` reports again (None: until it
        is forgotten)."""
        check_report(reporter, uses, busy_seconds, in_use)
        if not self._known(model_id):
            raise NotFound(
                f"model {model_id!r} not found",
                reason="MODEL_NOT_FOUND",
                metadata={"model_id": model_id},
            )
        now = self._clock()
        self.changes += 1
        until = None if lease is None else now + lease
        record = self.of(model_id)
        record.record(now, reporter, uses, busy_seconds, in_use, open_until=until)
        if (uses or in_use) and reporter not in (ACQUIRING, HOLDING):
            # The use it was held for has begun (or already ended: an
            # engine's report coalesces a short use() into `uses`).
            record.forget(now, HOLDING)

    def hold(self, model_id: str, seconds: float) -> None:
        """An Acquire made `model_id` ready: hold it in use for `seconds`
        (from now: a later hold replaces an earlier one), or until another
        reporter reports a use of it. Nothing for an id the daemon doesn't know."""
        if seconds > 0 and self._known(model_id):
            now = self._clock()
            self.changes += 1
            self.of(model_id).record(now, HOLDING, 0, 0.0, 1, open_until=now + seconds)

    def forget(self, model_id: str, reporter: str) -> None:
        """`reporter` is gone (an engine's attachment ended): its open uses end."""
        record = self._records.get(model_id)
        if record is not None:
            self.changes += 1
            record.forget(self._clock(), reporter)

    def release(self, model_id: str) -> None:
        """`model_id` may have stopped being known (unloaded, deregistered):
        drop its record if so."""
        if not self._known(model_id) and self._records.pop(model_id, None) is not None:
            self.changes += 1

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._records


def check_report(reporter: str, uses: int, busy_seconds: float, in_use: int) -> None:
    """INVALID_ARGUMENT INVALID_ACTIVITY (metadata `field`) for a report no
    reporter could honestly make."""
    if not reporter:
        _invalid("reporter", "reporter must name who reports (an attachment, a router)")
    if len(reporter) > MAX_REPORTER:
        _invalid(
            "reporter",
            f"reporter is {len(reporter)} characters long; at most {MAX_REPORTER} are allowed",
        )
    if not 0 <= uses <= MAX_USES:
        _invalid("uses", f"uses must be between 0 and {MAX_USES}, got {uses}")
    if not 0 <= in_use <= MAX_IN_USE:
        _invalid("in_use", f"in_use must be between 0 and {MAX_IN_USE}, got {in_use}")
    if not (math.isfinite(busy_seconds) and 0 <= busy_seconds <= MAX_BUSY_SECONDS):
        _invalid(
            "busy",
            f"busy must be a time between 0 and {MAX_BUSY_SECONDS} seconds, got {busy_seconds}s",
        )


def _invalid(field: str, message: str) -> None:
    raise InvalidArgument(
        f"invalid activity report: {message}",
        reason="INVALID_ACTIVITY",
        metadata={"field": field},
    )
