"""Who holds an attachment's weights, and when the daemon may take them.

The gate is the agent's synchronisation and nothing else: no sockets, no
mappings of its own. `use()` blocks enter and leave it; a quiesce closes it
to new blocks, waits for the running ones to end and has the weights
unmapped; the end of the attachment (or a close) has them unmapped or
released once the last block ends. What the weights are is behind the
`Weights` protocol (the agent's `Layout`; a recorder in the tests), and
every change to them is made under the gate's lock, so a waiter never sees
half of one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from torpor.errors import TorporError

__all__ = ["Closing", "Gate", "Usage", "Weights"]


class Weights(Protocol):
    """The layers the gate guards: whether each is mapped, and letting go."""

    def mapped(self, layer: str) -> bool: ...

    def all_mapped(self) -> bool: ...

    def unmap(self, layers: Sequence[str] = ()) -> None:
        """Unmap those of `layers` (every layer if empty) that are mapped."""

    def release(self) -> None:
        """Give every range back: the attachment is closed."""


@dataclass(frozen=True)
class Closing:
    """What `Gate.close` found: whether the attachment had ended already
    (its stream is over), whether the weights were let go of now (no block
    held them), and what letting go raised, if anything."""

    stream_over: bool
    released: bool
    failed: BaseException | None


@dataclass(frozen=True)
class Usage:
    """The engine's use() blocks since the last `Gate.usage()`: how many
    ended and their time summed, and how many are open now. Nested blocks
    of one thread count as the outermost one."""

    uses: int
    busy_seconds: float
    in_use: int


class Gate:
    """The `use()` blocks of one attachment and what may end or interrupt them.

    Thread-safe; `model_id` only names the model in errors. It also counts
    the blocks for the daemon's activity record (`usage`), under the lock
    it takes anyway: `on_usage` is called when a count changes for the first
    time since the last `usage()` (outside the lock), so a reporter needs
    no polling.
    """

    def __init__(
        self, model_id: str, weights: Weights, on_usage: Callable[[], None] | None = None
    ) -> None:
        self.model_id = model_id
        self._weights = weights
        self._cond = threading.Condition()
        self._users = 0  # use() blocks running
        self.on_usage = on_usage
        self._open = 0  # outermost use() blocks running
        self._uses = 0  # outermost blocks ended since the last usage()
        self._busy = 0.0  # ... and their time
        self._changed = False  # a count changed since the last usage()
        self._held = threading.local()  # .depth: this thread's use() blocks
        self._quiescing = False
        self._ended: TorporError | None = None  # why the attachment is over
        self._closed = False

    @property
    def ended(self) -> TorporError | None:
        """Why the attachment is over, or None while it lasts."""
        return self._ended

    def ready(self, layer: str | None = None) -> bool:
        """Whether a layer (or, with none given, every layer) is mapped now."""
        with self._cond:
            if layer is None:
                return self._weights.all_mapped()
            return self._weights.mapped(layer)

    # -- the engine's side -----------------------------------------------------------

    def wait_layer(self, layer: str, timeout: float | None = None) -> None:
        """Block until `layer` is mapped (see AttachedModel.wait_layer)."""
        if self._weights.mapped(layer) and self._ended is None:  # every forward pre-hook's path
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._check_usable()
                if self._weights.mapped(layer):
                    return
                if self._quiescing:
                    raise _withdrawn(self.model_id)
                if not self._cond.wait(_left(deadline)) and _left(deadline) == 0:
                    raise TorporError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "LAYER_NOT_READY",
                        f"layer {layer} of {self.model_id!r} did not come back within {timeout:g}s",
                    )

    def enter(self, *, wait: bool = True, timeout: float | None = None) -> int:
        """Begin a use() block (see AttachedModel.use); `leave(token)`, with
        what this returned, ends it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        depth: int = getattr(self._held, "depth", 0)
        with self._cond:
            while True:
                self._check_usable()
                if depth:
                    # Nested in a block of this thread, which holds the weights
                    # already: a pending quiesce waits for that block, so this
                    # one must not wait for the quiesce.
                    if not wait or self._weights.all_mapped():
                        break
                    if self._quiescing:
                        raise _withdrawn(self.model_id)
                elif not self._quiescing and (not wait or self._weights.all_mapped()):
                    break
                if not self._cond.wait(_left(deadline)) and _left(deadline) == 0:
                    raise TorporError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "WEIGHTS_NOT_READY",
                        f"the weights of {self.model_id!r} did not come back within {timeout:g}s",
                    )
            self._users += 1
            first = False
            if not depth:
                self._open += 1
                first, self._changed = not self._changed, True
        self._held.depth = depth + 1
        if first and self.on_usage is not None:
            self.on_usage()
        return depth

    def leave(self, token: int, busy_seconds: float = 0.0) -> bool:
        """End a use() block, which held the weights for `busy_seconds`. True
        when it was the last block of an attachment that has ended: the
        weights are let go of now (unmapped, or released after a close) and
        the daemon may be told so."""
        self._held.depth = token
        first = False
        with self._cond:
            self._users -= 1
            if not token:
                self._open -= 1
                self._uses += 1
                self._busy += busy_seconds
                first, self._changed = not self._changed, True
            over = self._users == 0 and self._ended is not None
            if over:
                if self._closed:
                    self._weights.release()
                else:
                    self._weights.unmap()
            self._cond.notify_all()
        if first and self.on_usage is not None:
            self.on_usage()
        return over

    def usage(self) -> Usage | None:
        """The use() blocks since the last call, or None if nothing changed."""
        with self._cond:
            if not self._changed:
                return None
            usage = Usage(self._uses, self._busy, self._open)
            self._uses, self._busy, self._changed = 0, 0.0, False
        return usage

    # -- the daemon's side -----------------------------------------------------------

    def apply(self, change: Callable[[], None]) -> bool:
        """Make a change to the weights (mapping layers) under the gate, and
        wake the waiters; False, changing nothing, once the attachment is
        closed."""
        with self._cond:
            if self._closed:
                return False
            change()
            self._cond.notify_all()
        return True

    @contextlib.contextmanager
    def quiescing(self) -> Iterator[None]:
        """For the length of the block no use() block starts (but nested
        ones) and wait_layer() callers give up: the daemon is taking layers."""
        with self._cond:
            self._quiescing = True
            self._cond.notify_all()  # wait_layer() callers give up
        try:
            yield
        finally:
            with self._cond:
                self._quiescing = False
                self._cond.notify_all()

    def drain(self, layers: Sequence[str], timeout: float | None) -> None:
        """Wait for every use() block to end, then unmap `layers` (every
        layer if empty). Past `timeout` (the daemon revokes the attachment
        then anyway) the attachment ends with ABORTED QUIESCE_TIMEOUT, raised,
        and the blocks keep their weights until they end."""
        # Stop waiting at the daemon's deadline, so the engine's waiters learn
        # why at once.
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._users:
                timed_out = not self._cond.wait(_left(deadline))
                if timed_out and self._users and _left(deadline) == 0:
                    self._ended = TorporError(
                        grpc.StatusCode.ABORTED,
                        "QUIESCE_TIMEOUT",
                        f"use() blocks still held the weights of {self.model_id!r}"
                        f" {timeout:g}s after the daemon asked for them; the attachment"
                        " is revoked",
                    )
                    raise self._ended
            self._weights.unmap(layers)

    def end(self, err: TorporError) -> bool | None:
        """The attachment is over, for `err`. None when it had ended already
        for something else (a close got here first); else whether the weights
        were let go of now (no block held them; otherwise the last one to end
        lets go, see `leave`)."""
        with self._cond:
            if self._ended is not None and self._ended is not err:
                return None
            self._ended = err
            # Whatever ended it (revoked, model unloaded, daemon stopped or
            # crashed), the weights are no longer the daemon's to give: unmap,
            # now or when the last use() block ends, so a stray access faults
            # and no orphaned memory stays alive through this process.
            idle = self._users == 0
            if idle:
                self._weights.unmap()
            self._cond.notify_all()
        return idle

    def close(self) -> Closing:
        """The engine detaches: nothing is mapped any more, and the ranges are
        released now if no use() block holds them (else by the last to end)."""
        with self._cond:
            self._closed = True
            stream_over = self._ended is not None
            if self._ended is None:
                self._ended = TorporError(
                    grpc.StatusCode.CANCELLED, "DETACHED", "the engine detached"
                )
            released = self._users == 0
            failed: BaseException | None = None
            if released:
                try:
                    self._weights.release()
                except Exception as err:  # (a broken CUDA context): still detach
                    failed, released = err, False
            self._cond.notify_all()
        return Closing(stream_over, released, failed)

    # -- reattaching -----------------------------------------------------------------

    def needs_reattach(self) -> bool:
        """Whether the attachment has ended (and may be attached again);
        FAILED_PRECONDITION DETACHED once closed."""
        with self._cond:
            if self._closed:
                raise TorporError(grpc.StatusCode.FAILED_PRECONDITION, "DETACHED", "closed")
            return self._ended is not None

    def reopen(self) -> None:
        """The attachment lasts again (reattached)."""
        with self._cond:
            self._ended = None

    def fail(self, err: TorporError) -> None:
        """A reattach failed: the attachment is over, for `err`."""
        with self._cond:
            self._ended = err

    def _check_usable(self) -> None:
        if self._ended is not None:
            raise self._ended


def _withdrawn(model_id: str) -> TorporError:
    return TorporError(
        grpc.StatusCode.ABORTED,
        "WEIGHTS_WITHDRAWN",
        f"the daemon is taking the weights of {model_id!r} away",
    )


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
