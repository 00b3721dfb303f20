"""What the end-to-end tests read of a running daemon: its pools, its fds,
and a condition it reaches in the background."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

from torpor import Client


def used(client: Client) -> tuple[int, int]:
    """Device and host pool bytes in use."""
    node = client.get_node()
    return sum(d.used_bytes for d in node.devices), node.host_pool.used_bytes


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    """What a process's fds point at (to say what a leak is)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sorted(out)


def settle(check: Callable[[], bool], timeout: float = 30) -> bool:
    """Whether `check` comes true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
