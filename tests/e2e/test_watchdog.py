"""A real torpord under a watchdog: pings on its notify socket after READY=1,
none for a WATCHDOG_PID that is not its own. (A blocked loop stopping the
pings: tests/unit/test_systemd_watchdog.py, on a real loop and socket.)"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from torpor.testing import make_checkpoint

from .conftest import Daemon
from .engines import Worker

PING = "WATCHDOG=1"
HOLDER = Path(__file__).with_name("holder_engine.py")
# As systemd starts it: WATCHDOG_PID is the pid of the process it execs.
AS_ITS_OWN_PID = ("sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh")


def watched(
    root: Path, usec: int, launcher: tuple[str, ...], pid: str = "", roots: tuple[Path, ...] = ()
) -> Daemon:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
    env["WATCHDOG_USEC"] = str(usec)
    if pid:
        env["WATCHDOG_PID"] = pid
    return Daemon(root, env=env, launcher=launcher, roots=roots)


def receive_until(d: Daemon, done: Callable[[list[str]], bool]) -> None:
    d.notify.settimeout(30)
    while not done(d.notifications):
        d.notifications += d.notify.recv(4096).decode().split("\n")


def test_pings_follow_ready_and_continue(tmp_path: Path) -> None:
    d = watched(tmp_path, 400_000, AS_ITS_OWN_PID)
    try:
        d.wait_ready()
        receive_until(d, lambda got: got.count(PING) >= 3)
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


def test_pings_go_on_while_the_daemon_drains(tmp_path: Path) -> None:
    """Until the exit: an engine that doesn't let go holds the drain, and
    the pings keep coming after STOPPING=1."""
    sources = tmp_path / "sources"
    path = make_checkpoint(sources / "a", layers=2, hidden=32, seed=0)
    # A ping a second: the drain (the grace period, 5 s) sees a few.
    d = watched(tmp_path / "d", 4_000_000, AS_ITS_OWN_PID, roots=(sources,))
    holder = None
    try:
        d.wait_ready()
        d.call("torpor.v1.ModelService/LoadModel", {"model_id": "a", "source": str(path)})
        holder = Worker(d, "a", script=HOLDER)
        queued(d)  # (a full queue would block the daemon's sends, as it would systemd's)
        d.proc.send_signal(signal.SIGTERM)
        assert holder.read() == {"event": "quiesce"}  # the drain waits for it now
        receive_until(d, lambda got: "STOPPING=1" in got and PING in after(got, "STOPPING=1"))
        holder.ask_nowait("release")
        assert d.proc.wait(30) == 0
    finally:
        if holder is not None:
            holder.kill()
        d.kill()


def after(items: list[str], item: str) -> list[str]:
    return items[items.index(item) + 1 :]


def queued(d: Daemon) -> None:
    """Read what the daemon has sent so far, without waiting for more."""
    d.notify.setblocking(False)
    try:
        while True:
            d.notifications += d.notify.recv(4096).decode().split("\n")
    except BlockingIOError:
        pass
    finally:
        d.notify.settimeout(30)
