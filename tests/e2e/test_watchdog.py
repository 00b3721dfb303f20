"""A real torpord under a watchdog: pings on its notify socket after READY=1,
none for a WATCHDOG_PID that is not its own. (A blocked loop stopping the
pings: tests/unit/test_systemd_watchdog.py, on a real loop and socket.)"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from .conftest import Daemon

PING = "WATCHDOG=1"
# As systemd starts it: WATCHDOG_PID is the pid of the process it execs.
AS_ITS_OWN_PID = ("sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh")


def watched(root: Path, usec: int, launcher: tuple[str, ...], pid: str = "") -> Daemon:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
    env["WATCHDOG_USEC"] = str(usec)
    if pid:
        env["WATCHDOG_PID"] = pid
    return Daemon(root, env=env, launcher=launcher)


def test_pings_follow_ready_and_continue(tmp_path: Path) -> None:
    d = watched(tmp_path, 400_000, AS_ITS_OWN_PID)
    try:
        d.wait_ready()
        d.notify.settimeout(30)
        while d.notifications.count(PING) < 3:
            d.notifications += d.notify.recv(4096).decode().split("\n")
        # None before READY=1: systemd arms its timer at READY, and an early
        # ping would arm it while the backend pins the host pool.
        assert d.notifications.index("READY=1") < d.notifications.index(PING)
        assert d.stop() == 0
        assert "STOPPING=1" in d.notifications
    finally:
        d.kill()


def test_no_pings_for_another_process(tmp_path: Path) -> None:
    # The parent (the test) is the watched process, not the daemon.
    d = watched(tmp_path, 200_000, (), pid=str(os.getpid()))
    try:
        d.wait_ready()
        d.read_notifications(timeout=3)  # 15 intervals of what it would ping at
        assert d.stop() == 0
        assert PING not in d.notifications, d.notifications
        assert "STOPPING=1" in d.notifications
    finally:
        d.kill()


def test_the_watchdogs_abort_leaves_the_stacks_in_the_log(tmp_path: Path) -> None:
    """systemd ends a daemon whose pings stopped with SIGABRT: the log (the
    journal) shows where each thread was."""
    d = Daemon(tmp_path)
    try:
        d.wait_ready()
        assert d.stop(signal.SIGABRT) == -signal.SIGABRT
        log = d.log()
        assert "Fatal Python error: Aborted" in log, log
        assert "main.py" in log and "in main" in log, log
    finally:
        d.kill()
