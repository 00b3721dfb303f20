"""The sd_notify protocol, spoken directly (no libsystemd).

With `Type=notify`, systemd passes `$NOTIFY_SOCKET`, an AF_UNIX datagram
socket (a path, or an abstract name written with a leading "@"), and waits for
"READY=1" before it counts the service as started; "STOPPING=1" and
"STATUS=..." tell it and `systemctl status` what the daemon is doing. Outside
systemd the variable is unset and every call here is a cheap no-op, so the
daemon calls these unconditionally.

A failed send never raises: losing a status line must not take the daemon
down, and systemd's own timeouts already handle a READY that never arrives.

With `WatchdogSec=`, `Watchdog` pings from a task on the daemon's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

from torpord.logs import get_logger

__all__ = [
    "Watchdog",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog",
    "watchdog_usec",
]

_log = get_logger(__name__)

# Datagrams to systemd are tiny, but a wedged manager must not stall shutdown.
_SEND_TIMEOUT_S = 1.0


def _address(value: str) -> str | bytes | None:
    """The sockaddr for `$NOTIFY_SOCKET`, or None if it is not an AF_UNIX one."""
    if value.startswith("@"):
        # Linux abstract namespace: a leading NUL instead of the "@".
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return value
    return None  # e.g. "vsock:..." (VMs); not something torpord runs under


def notify(*fields: str) -> bool:
    """Send `fields` ("READY=1", "STATUS=...") as one datagram to `$NOTIFY_SOCKET`.

    Returns True if it was sent, False if there is no socket to send to or the
    send failed (logged at debug).
    """
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target or not fields:
        return False
    address = _address(target)
    if address is None:
        _log.debug("sd_notify: unsupported NOTIFY_SOCKET", notify_socket=target)
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.sendto(message, address)
    except OSError as exc:
        _log.debug("sd_notify: send failed", notify_socket=target, error=str(exc))
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the datagram ("STATUS=x\nREADY=1").
    return " ".join(text.splitlines())


def ready(status: str = "") -> bool:
    """Tell systemd that start-up is complete (the sockets listen)."""
    if status:
        return notify("READY=1", f"STATUS={_one_line(status)}")
    return notify("READY=1")


def stopping(status: str = "") -> bool:
    """Tell systemd that shutdown has begun, so it waits instead of counting a crash."""
    if status:
        return notify("STOPPING=1", f"STATUS={_one_line(status)}")
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Set the line `systemctl status torpord` shows."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    """Ping systemd's watchdog; call at least every `watchdog_usec()` / 2."""
    return notify("WATCHDOG=1")


def watchdog_usec() -> int | None:
    """The watchdog interval in microseconds if systemd expects pings from us, else None."""
    pid = os.environ.get("WATCHDOG_PID")
    # WATCHDOG_PID names the process the interval is for; a child that inherited
    # the environment must not think it is being watched.
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


class Watchdog:
    """Pings systemd's watchdog from the event loop while the loop keeps time.

    The pings come from a task on the daemon's own loop, not from a thread:
    a loop that is blocked (a call that never returns, a spin without an
    await) sends none, and systemd kills and restarts the daemon once
    `timeout` has passed without one. A loop that is stalled most of the
    time would still get a ping out between two stalls, so a wake-up that
    comes later than half the timeout sends nothing (and is counted in
    `skipped`): a stall of more than three quarters of the timeout always
    ends in a restart, one of under half never does.

    Start it after READY=1, not before: systemd arms the watchdog when the
    start-up completes, and a ping during start-up would arm it early, while
    the backend pins the host pool (minutes) with the loop blocked.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        # Two chances per half timeout, the rate sd_watchdog_enabled(3) asks for.
        self.interval = timeout / 4
        self.lag_limit = timeout / 2
        self.pings = 0
        self.skipped = 0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_env(cls) -> Watchdog | None:
        """A watchdog for `$WATCHDOG_USEC`, or None if systemd expects no pings from us."""
        usec = watchdog_usec()
        return None if usec is None else cls(usec / 1_000_000)

    def start(self) -> None:
        """Ping now and then every `interval`, from the running loop, until `stop`."""
        if self._task is None:
            _log.info("systemd watchdog on", timeout_seconds=self.timeout)
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="systemd-watchdog"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _ping(self) -> None:
        if watchdog():
            self.pings += 1

    async def _run(self) -> None:
        self._ping()
        while True:
            # time.monotonic, not loop.time: uvloop's clock is read once per
            # loop iteration, so it can't see a stall inside the iteration.
            due = time.monotonic() + self.interval
            await asyncio.sleep(self.interval)
            late = time.monotonic() - due
            if late > self.lag_limit:
                self.skipped += 1
                _log.warning(
                    "the event loop stalled: no watchdog ping for this late wake-up",
                    late_seconds=round(late, 3),
                    watchdog_seconds=self.timeout,
                )
                continue
            self._ping()
