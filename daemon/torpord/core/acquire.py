"""Acquire: a request for a model arrived; make it ready.

A router calls it as each request arrives. An ACTIVE model is ready at
once (a hit); an ASLEEP or OFFLOADED one wakes; a catalogue entry not
loaded is loaded; room is made by the eviction policy (the pilot's
`with_room`). A sleeper read from its source or a disk copy, when room
must be made for it, is read into host memory first (the pilot's
`stage`), so the models evicted for it serve until the fast copy from
there. Concurrent Acquires of one model share one transition, and one
that finds a caller's transition running (a Wake, say) waits for it and
then makes the model ready from where it left it. Each Acquire counts as a
use of the model, and its time to ready and whether it was a hit are kept
(the last few) and logged.

Ready is held: from its start until `acquire_hold` seconds after the model
is ready, an Acquire holds it in use (core/activity.py), so the router's
request finds it where the Acquire left it: another Acquire (or any
caller's call) that needs room evicts other models, or waits its
`acquire_patience` and is refused naming the held model `in_use`. The hold
is taken in the same step that sees the model ready, so no eviction can
come between. It ends early once the engine's use() or the router
reports a use of the model (core/activity.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from torpord.core.activity import ACQUIRING
from torpord.core.model import ModelSnapshot
from torpord.core.pilot import Pilot
from torpord.core.preempt import preempt
from torpord.core.registry import busy
from torpord.core.requests import MAX_REQUEST_ID
from torpord.core.steering import Steered
from torpord.errors import Aborted, FailedPrecondition, InvalidArgument
from torpord.types import Cause, ModelState

__all__ = ["FIGURES_KEPT", "AcquireListener", "Acquired", "Acquirer", "Figure"]

log = structlog.get_logger("torpord.pilot")

FIGURES_KEPT = 1024  # the last Acquires' figures, for the metrics
# How often an Acquire goes round (a transition it waited for left the
# model short of ready, a caller changed it meanwhile) before it gives up.
ROUNDS = 8


@dataclass(frozen=True)
class Acquired:
    snapshot: ModelSnapshot
    hit: bool  # ACTIVE when asked: nothing had to move
    seconds: float  # from the call until the model was ready


@dataclass(frozen=True)
class Figure:
    model_id: str
    hit: bool
    seconds: float


# Told of each Acquire of a known model as it ends: its figure, and whether
# it made the model ready (False: it failed; its seconds are until then).
AcquireListener = Callable[[Figure, bool], None]


class Acquirer:
    def __init__(self, manager: Steered, pilot: Pilot) -> None:
        self._m = manager
        self._pilot = pilot
        self._readying: dict[str, asyncio.Task[ModelSnapshot]] = {}
        self._running: dict[str, int] = {}  # model id -> Acquires of it running
        self.figures: deque[Figure] = deque(maxlen=FIGURES_KEPT)
        self._listeners: list[AcquireListener] = []

    def listen(self, listener: AcquireListener) -> Callable[[], None]:
        """Tell `listener` of each Acquire that ends from now on (on the event
        loop's thread: it must not block); returns the function that stops it."""
        self._listeners.append(listener)

        def stop() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return stop

    def _tell(self, figure: Figure, ready: bool) -> None:
        for listener in list(self._listeners):
            listener(figure, ready)

    async def acquire(self, model_id: str, *, request_id: str = "") -> Acquired:
        clock = time.monotonic()
        _check_request_id(request_id)
        model = self._m.registry.find(model_id)
        if model is None and not self._m.known(model_id):
            self._m.registry.model(model_id)  # NOT_FOUND (or INVALID_MODEL_ID)
        self._start(model_id)
        hit = model is not None and model.state is ModelState.ACTIVE and not model.busy
        ready = False
        try:
            if hit:
                snapshot = model.snapshot() if model is not None else self._m.registry.get(model_id)
            else:
                task = self._readying.get(model_id)
                if task is None:
                    task = asyncio.create_task(self._ready(model_id), name=f"acquire {model_id}")
                    self._readying[model_id] = task
                    task.add_done_callback(lambda _: self._readying.pop(model_id, None))
                snapshot = await asyncio.shield(task)
            ready = True
        except Exception:  # (a caller that went away is not a failure of the Acquire)
            self._tell(Figure(model_id, False, time.monotonic() - clock), False)
            raise
        finally:
            self._end(model_id, held=ready)
        seconds = time.monotonic() - clock
        figure = Figure(model_id, hit, seconds)
        self.figures.append(figure)
        self._tell(figure, True)
        log.info(
            "acquired",
            model_id=model_id,
            request_id=request_id,
            hit=hit,
            time_to_ready=round(seconds, 4),
        )
        return Acquired(snapshot, hit, seconds)

    def _start(self, model_id: str) -> None:
        """An Acquire of `model_id` begins: a use, held open while it runs."""
        running = self._running.get(model_id, 0) + 1
        self._m.activity.record(model_id, ACQUIRING, 1, 0.0, running)
        self._running[model_id] = running

    def _end(self, model_id: str, *, held: bool) -> None:
        """It ended; `held`: with the model ready, which stays held in use for
        `acquire_hold` seconds (in this same step: nothing runs between)."""
        running = self._running.pop(model_id) - 1
        if running:
            self._running[model_id] = running
        if held:
            self._m.activity.hold(model_id, self._m.settings.acquire_hold)
        if self._m.known(model_id):  # (else its record went with it)
            self._m.activity.record(model_id, ACQUIRING, 0, 0.0, running)

    async def _ready(self, model_id: str) -> ModelSnapshot:
        """Bring the model to ACTIVE, from wherever it is (the shared work)."""
        m = self._m
        for _ in range(ROUNDS):
            model = m.registry.find(model_id)
            if model is None:
                if (validation := m.registry.validating.get(model_id)) is not None:
                    await asyncio.shield(validation.done)  # a caller's Load: it decides
                    await asyncio.sleep(0)  # (its task starts)
                    continue
                entry = self._pilot.entry(model_id)
                if entry is None:
                    m.registry.model(model_id)  # NOT_FOUND: gone meanwhile
                    continue
                source, device = entry
                if await self._pilot.stage(model_id):
                    continue  # (loaded to host memory: woken from there next round)
                try:
                    await m.load(model_id, source, device=device, cause=Cause.ACQUIRE)
                except Aborted as err:
                    if err.reason != "TRANSITION_IN_PROGRESS":
                        raise
                continue
            if model.busy:
                await preempt(model, Cause.ACQUIRE)  # a policy's sleep: stopped
                if model.running is not None and not model.running.task.done():
                    await asyncio.wait([model.running.task])  # a caller's: joined
                continue
            if model.state is ModelState.ACTIVE:
                return model.snapshot()
            if model.state is ModelState.FAILED:
                raise FailedPrecondition(
                    f"model {model_id!r} is FAILED ({model.state_reason or 'no reason given'}):"
                    " unload it, or load it again",
                    reason="INVALID_STATE",
                    metadata={
                        "model_id": model_id,
                        "state": model.state.value,
                        "state_reason": model.state_reason,
                    },
                )
            if model.state.transitional:  # (an image being published: no task to wait for)
                raise busy(model_id, model.state.value)
            if await self._pilot.stage(model_id):
                continue  # (in host memory now: woken from there next round)
            try:
                await m.wake(model_id, cause=Cause.ACQUIRE)
            except Aborted as err:
                if err.reason != "TRANSITION_IN_PROGRESS":
                    raise
        raise Aborted(
            f"model {model_id!r} kept changing while it was being made ready; acquire it again",
            reason="TRANSITION_IN_PROGRESS",
            metadata={"model_id": model_id},
        )


def _check_request_id(request_id: str) -> None:
    # Acquire is idempotent by nature (ready is ready): the id is only logged,
    # and bounded as every mutation's is.
    size = len(request_id.encode(errors="backslashreplace"))
    if size > MAX_REQUEST_ID:
        raise InvalidArgument(
            f"request_id is {size:,} bytes long; at most {MAX_REQUEST_ID} are allowed",
            reason="FIELD_TOO_LONG",
            metadata={"field": "request_id", "limit": MAX_REQUEST_ID, "size": size},
        )
