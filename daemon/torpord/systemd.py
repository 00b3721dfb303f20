"""The sd_notify protocol, spoken directly (no libsystemd).

With `Type=notify`, systemd passes `$NOTIFY_SOCKET`, an AF_UNIX datagram
socket (a path, or an abstract name written with a leading "@"), and waits for
"READY=1" before it counts the service as started; "STOPPING=1" and
"STATUS=..." tell it and `systemctl status` what the daemon is doing. Outside
systemd the variable is unset and every call here is a cheap no-op, so the
daemon calls these unconditionally.

A failed send never raises: losing a status line must not take the daemon
down, and systemd's own timeouts already handle a READY that never arrives.
"""

from __future__ import annotations

import os
import socket

from torpord.logs import get_logger

__all__ = ["notify", "ready", "status", "stopping", "watchdog", "watchdog_usec"]

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
