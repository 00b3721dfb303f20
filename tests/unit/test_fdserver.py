"""The fd socket when the daemon's event loop does not answer in time: the
engine gets a clear error, and the fds of an export that finishes later are
closed, not leaked."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from torpor.agent.attach import request_fds
from torpor.errors import TorporError
from torpord.server import agents


class SlowRegistry:
    """Stands in for the registry: its export answers after the fd socket
    gave up, with a real pipe's fds."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.exported = threading.Event()

    async def export(self, *args: Any) -> tuple[dict[str, Any], list[int]]:
        time.sleep(0.5)  # the loop is stuck: this blocks it
        self.fds = list(os.pipe())
        self.pipe = os.readlink(f"/proc/self/fd/{self.fds[0]}")  # "pipe:[inode]"
        self.exported.set()
        return {"layers": []}, self.fds


def open_pipe_ends(pipe: str) -> int:
    """How many of this process's fds are ends of `pipe`."""
    ends = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the listing's own fd)
            ends += os.readlink(f"/proc/self/fd/{name}") == pipe
    return ends


def test_a_late_export_is_refused_and_its_fds_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agents, "EXPORT_TIMEOUT", 0.1)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    registry = SlowRegistry()
    server = agents.FdServer(registry, tmp_path / "fds.sock", loop)  # type: ignore[arg-type]
    server.start(0o600)
    try:
        with pytest.raises(TorporError) as err:
            request_fds(str(server.path), "any", [], timeout=10)
        assert (err.value.code.name, err.value.reason) == ("UNAVAILABLE", "DAEMON_BUSY")
        assert registry.exported.wait(10)
        deadline = time.monotonic() + 10
        while open_pipe_ends(registry.pipe) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert open_pipe_ends(registry.pipe) == 0  # closed by the late-export callback
    finally:
        server.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
