"""The fd socket: when the daemon's event loop does not answer in time the
engine gets a clear error and the fds of an export that finishes later are
closed, not leaked; a malformed request gets an error answer, never a dead
thread; idle connections take no thread and cannot lock an engine out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torpor.agent.attach import request_fds
from torpor.errors import TorporError
from torpord.server.fdsocket import FdServer


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


def test_a_late_export_is_refused_and_its_fds_closed(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    registry = SlowRegistry()
    server = FdServer(registry, tmp_path / "fds.sock", loop, export_timeout=0.1)  # type: ignore[arg-type]
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


class Recorder:
    """Stands in for the registry: records what it was asked, exports nothing."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, list[str], str]] = []

    async def export(
        self, attachment_id: str, pid: int, names: list[str], model_id: str, pidfd: int | None
    ) -> tuple[dict[str, Any], list[int]]:
        if pidfd is not None:
            os.close(pidfd)
        self.asked.append((attachment_id, names, model_id))
        return {"layers": [], "absent": names}, []

    async def late_release(self, attachment_id: str, pid: int) -> bool:
        return False


@pytest.fixture
def fd_server(tmp_path: Path) -> Iterator[tuple[FdServer, Recorder]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    registry = Recorder()
    server = FdServer(registry, tmp_path / "fds.sock", loop, request_timeout=1.0)  # type: ignore[arg-type]
    server.start(0o600)
    try:
        yield server, registry
    finally:
        server.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def read_answer(conn: socket.socket) -> dict[str, Any]:
    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            assert chunk, "closed without an answer"
            out += chunk
        return out

    (n,) = struct.unpack("<I", exact(4))
    answer: dict[str, Any] = json.loads(exact(n))
    return answer


def ask(path: Path, body: bytes, length: int | None = None) -> dict[str, Any]:
    """Send one raw request; the daemon's answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(path))
        conn.sendall(struct.pack("<I", len(body) if length is None else length))
        if length is None:
            conn.sendall(body)
        return read_answer(conn)


SECRET = "s3cr3t-value"
BAD_REQUESTS: dict[str, tuple[bytes, int | None, str, str]] = {
    # name: (body, length to claim, reason, field)
    "100k_deep": (b"[" * 100_000 + b"]" * 100_000, None, "BAD_REQUEST", ""),
    "not_json": (f"{{{SECRET}".encode(), None, "BAD_REQUEST", ""),
    "not_utf8": (b'{"attachment_id": "\xff"}', None, "BAD_REQUEST", ""),
    "a_list": (json.dumps([SECRET]).encode(), None, "BAD_REQUEST", ""),
    "id_not_a_string": (b'{"attachment_id": 12}', None, "BAD_REQUEST", ""),
    "layers_not_a_list": (json.dumps({"layers": SECRET}).encode(), None, "BAD_REQUEST", ""),
    "a_layer_not_a_string": (b'{"layers": [{"a": 1}]}', None, "BAD_REQUEST", ""),
    "release_not_a_bool": (b'{"release": "yes"}', None, "BAD_REQUEST", ""),
    "long_id": (
        json.dumps({"attachment_id": SECRET * 1000}).encode(),
        None,
        "FIELD_TOO_LONG",
        "attachment_id",
    ),
    "long_layer": (
        json.dumps({"layers": ["pre", SECRET * 100]}).encode(),
        None,
        "FIELD_TOO_LONG",
        "layers[1]",
    ),
    "many_layers": (
        json.dumps({"layers": ["x"] * 5000}).encode(),
        None,
        "TOO_MANY_ITEMS",
        "layers",
    ),
    "huge": (b"", 1 << 31, "FIELD_TOO_LONG", "the request"),
}


def test_a_bad_request_gets_its_error_and_the_socket_serves_on(
    fd_server: tuple[FdServer, Recorder],
) -> None:
    server, registry = fd_server
    for name, (body, length, reason, field) in BAD_REQUESTS.items():
        error = ask(server.path, body, length)["error"]
        assert (error["code"], error["reason"]) == ("INVALID_ARGUMENT", reason), name
        assert field in error["message"] and SECRET not in error["message"], name
    # Every thread is still there to serve a good one.
    for _ in range(10):
        header, fds = request_fds(str(server.path), "id", ["pre"], model_id="m", timeout=30)
        assert header["absent"] == ["pre"] and fds == []
    assert registry.asked == [("id", ["pre"], "m")] * 10
    # One that arrives in pieces is put together.
    body = json.dumps({"attachment_id": "id", "layers": ["post"]}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(server.path))
        for piece in (struct.pack("<I", len(body))[:2], struct.pack("<I", len(body))[2:], body[:7]):
            conn.sendall(piece)
            time.sleep(0.05)  # (so each is likely read on its own)
        conn.sendall(body[7:])
        assert read_answer(conn)["absent"] == ["post"]


def test_idle_connections_are_answered_and_cannot_lock_an_engine_out(
    fd_server: tuple[FdServer, Recorder],
) -> None:
    server, registry = fd_server
    threads = threading.active_count()
    idle = []
    try:
        for _ in range(300):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(conn)
            conn.connect(str(server.path))  # (blocking: it waits for room in the backlog)
            conn.settimeout(30)
        idle[-1].sendall(b"\x10\0")  # half a length, then nothing
        # An engine is served while they are all still open...
        header, _ = request_fds(str(server.path), "id", [], timeout=30)
        assert header["fd_count"] == 0 and registry.asked == [("id", [], "")]
        # ... with no thread for any of them...
        assert threading.active_count() <= threads
        # ... and each is told why it is closed: pushed out, or too slow.
        reasons = {read_answer(conn)["error"]["reason"] for conn in idle}
        assert reasons == {"FD_SOCKET_BUSY", "REQUEST_TIMEOUT"}
    finally:
        for conn in idle:
            conn.close()
