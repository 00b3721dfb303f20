"""Telling the daemon how the engine uses the model, cheaply.

The gate counts the use() blocks under the lock it takes anyway; a reporter
thread sends what changed as one ActivityReport on the Attach stream: soon
after the first change since its last report (so the daemon learns at once
that an idle model is in use again), then at most once a `period`, and a
last time when the engine detaches. A quiet engine costs nothing: the thread
sleeps until the gate says something changed, and the gate says so once per
report, not once per block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from google.protobuf.duration_pb2 import Duration

from torpor.agent._gate import Usage
from torpor.v1 import agent_pb2

__all__ = ["PERIOD", "Reporter", "report"]

PERIOD = 1.0  # seconds: at most one report a second per attachment


class Reporter:
    """Sends `take()` (a Usage, or None when nothing changed) with `send`."""

    def __init__(
        self,
        name: str,
        take: Callable[[], Usage | None],
        send: Callable[[Usage], None],
        period: float = PERIOD,
    ) -> None:
        self._take, self._send = take, send
        self.period = period
        self._wake = threading.Event()  # something changed since the last report
        self._stop = threading.Event()
        self._sending = threading.Lock()  # (reports leave in the order they were taken)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def poke(self) -> None:
        """Something changed (the gate's `on_usage`): report it soon."""
        self._wake.set()

    def flush(self) -> None:
        """Report what changed, now (the engine lets go or detaches)."""
        with self._sending:
            usage = self._take()
            if usage is not None:
                self._send(usage)

    def stop(self) -> None:
        """No more reports but a last one (`flush`, by the caller)."""
        self._stop.set()
        self._wake.set()
        if self._started and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stop.is_set():
                return
            self._wake.clear()  # (before taking: a change after it wakes us again)
            self.flush()
            # The rate limit: changes meanwhile wait for the next report (the
            # gate pokes a set event then, which costs no wake-up).
            if self._stop.wait(self.period):
                return


def report(usage: Usage) -> agent_pb2.AttachRequest:
    """The Attach stream's message for `usage`."""
    busy = Duration()
    busy.FromNanoseconds(round(usage.busy_seconds * 1e9))
    return agent_pb2.AttachRequest(
        activity=agent_pb2.ActivityReport(uses=usage.uses, busy=busy, in_use=usage.in_use)
    )
