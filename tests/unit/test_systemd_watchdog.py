"""torpord.systemd.Watchdog on a real uvloop event loop, pinging a real
AF_UNIX notify socket: pings while the loop runs, none while it is blocked
or stalled most of the time, pings again once it runs freely.

The loop sends its own markers ("TEST=...") to the same socket from the same
thread, so the order of the datagrams says what happened while it was
blocked; nothing here asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop
from torpord import systemd

PING = "WATCHDOG=1"
# Pings every 0.25 s; a wake-up over 0.5 s late sends none.
TIMEOUT_USEC = 1_000_000
# How long a test waits for something that should come (a failure guard only).
PATIENCE = 30.0


class Receiver:
    """Every datagram the socket gets, in order, read by a thread of its own
    (the loop under test may be blocked)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.got: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                self.got += self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, first: str, last: str) -> list[str]:
        start, end = self.got.index(first), self.got.index(last)
        assert start < end, self.got
        return self.got[start + 1 : end]

    def after(self, marker: str) -> list[str]:
        return self.got[self.got.index(marker) + 1 :]

    async def wait_for_pings(self, count: int, after: str | None = None) -> None:
        """Until `count` pings came (after the marker `after`, if given)."""

        def seen() -> list[str]:
            if after is None:
                return self.got
            return self.after(after) if after in self.got else []

        deadline = time.monotonic() + PATIENCE
        while seen().count(PING) < count or (after is not None and after not in self.got):
            assert time.monotonic() < deadline, f"fewer than {count} pings: {self.got}"
            await asyncio.sleep(0.05)


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    name = f"torpor-watchdog-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        monkeypatch.setenv("WATCHDOG_USEC", str(TIMEOUT_USEC))
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        r = Receiver(sock)
        try:
            yield r
        finally:
            r.close()


def mark(text: str) -> str:
    """Send a marker from the calling thread (the loop's) to the socket."""
    assert systemd.notify(f"TEST={text}")
    return f"TEST={text}"


def on_uvloop(test: Callable[[systemd.Watchdog], Coroutine[Any, Any, None]]) -> systemd.Watchdog:
    """Run `test` with a started watchdog on a uvloop loop, as the daemon does."""

    async def main() -> systemd.Watchdog:
        watchdog = systemd.Watchdog.from_env()
        assert watchdog is not None
        watchdog.start()
        try:
            await test(watchdog)
        finally:
            await watchdog.stop()
        return watchdog

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def test_pings_come_while_the_loop_runs_and_end_with_stop(receiver: Receiver) -> None:
    async def test(watchdog: systemd.Watchdog) -> None:
        await receiver.wait_for_pings(3)
        await watchdog.stop()
        stopped = mark("stopped")
        await asyncio.sleep(4 * watchdog.interval)
        end = mark("end")
        await receiver.wait_for_pings(0, after=end)
        assert receiver.between(stopped, end) == []

    watchdog = on_uvloop(test)
    assert watchdog.pings >= 3


def test_a_blocked_loop_sends_no_pings_then_pings_again(receiver: Receiver) -> None:
    async def test(watchdog: systemd.Watchdog) -> None:
        await receiver.wait_for_pings(2)
        start = mark("blocked")
        time.sleep(2 * watchdog.timeout)  # a blocking call on the loop
        end = mark("unblocked")
        await receiver.wait_for_pings(2, after=end)
        assert PING not in receiver.between(start, end)
        # Its first wake-up after the block came late: it did not count as alive.
        assert watchdog.skipped >= 1

    on_uvloop(test)


def test_a_loop_stalled_most_of_the_time_sends_no_pings(receiver: Receiver) -> None:
    """Between stalls the loop runs (its timers fire), but only late: no ping
    may make such a loop look healthy."""

    async def test(watchdog: systemd.Watchdog) -> None:
        await receiver.wait_for_pings(2)
        start = mark("stalling")
        for _ in range(4):
            time.sleep(watchdog.timeout)
            await asyncio.sleep(0)  # the watchdog's timer runs here, late
        end = mark("running")
        await receiver.wait_for_pings(2, after=end)
        assert PING not in receiver.between(start, end)
        assert watchdog.skipped >= 1

    on_uvloop(test)


def test_from_env_is_for_the_watched_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.Watchdog.from_env() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.Watchdog.from_env() is None  # meant for another process
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    watchdog = systemd.Watchdog.from_env()
    assert watchdog is not None
    assert (watchdog.timeout, watchdog.interval) == (30.0, 7.5)
