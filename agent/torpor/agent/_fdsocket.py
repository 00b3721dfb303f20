"""The agent's side of the daemon's fd socket: one length-prefixed JSON
request per connection, answered with a JSON header and, for the slabs of an
attachment, their fds (SCM_RIGHTS)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import grpc

from torpor.errors import TorporError

__all__ = ["request_fds", "request_release"]


def request_fds(
    fd_socket: str,
    attachment_id: str,
    layers: list[str] | None = None,
    *,
    model_id: str = "",
    timeout: float = 60.0,
) -> tuple[dict[str, Any], list[int]]:
    """Ask the daemon's fd socket for the slabs of an attachment: (header, fds).

    The header lists the layers sent (name, size; one fd each, in order) and
    those asked for but not on the device ("absent")."""
    request = {"attachment_id": attachment_id, "model_id": model_id, "layers": layers or []}
    with _ask_fd_socket(fd_socket, request, timeout) as (conn, header):
        fds: list[int] = []
        try:
            while len(fds) < header["fd_count"]:
                _, got, _, _ = socket.recv_fds(conn, 1, header["fd_count"] - len(fds))
                if not got:
                    raise TorporError(
                        grpc.StatusCode.UNAVAILABLE, "FDS_TRUNCATED", "the daemon sent too few fds"
                    )
                fds.extend(got)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return header, fds


def request_release(fd_socket: str, attachment_id: str, *, timeout: float = 5.0) -> bool:
    """Tell the daemon's fd socket that this process unmapped every slab of an
    attachment whose stream has ended; whether it was holding any for it."""
    request = {"attachment_id": attachment_id, "release": True}
    with _ask_fd_socket(fd_socket, request, timeout) as (_, answer):
        return bool(answer.get("released"))


@contextlib.contextmanager
def _ask_fd_socket(
    fd_socket: str, request: dict[str, Any], timeout: float
) -> Iterator[tuple[socket.socket, dict[str, Any]]]:
    """Send one length-prefixed JSON request; yields the connection and the
    daemon's answer, or raises the error it answered with. A daemon too busy
    to take the connection (its backlog full, or FD_SOCKET_BUSY: it pushes
    out idle connections when too many wait) is asked again until `timeout`."""
    body = json.dumps(request).encode()
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            try:
                conn.connect(fd_socket)
                conn.sendall(struct.pack("<I", len(body)) + body)
                answer = _recv_json(conn)
            except BlockingIOError:  # (a Unix socket's full backlog, with a timeout set)
                answer = {"error": {"code": "UNAVAILABLE", "reason": "FD_SOCKET_BUSY",
                                    "message": "the fd socket's backlog is full"}}  # fmt: skip
            error = answer.get("error")
            if error is None:
                yield conn, answer
                return
            if error["reason"] != "FD_SOCKET_BUSY" or time.monotonic() + pause > deadline:
                raise TorporError(
                    getattr(grpc.StatusCode, error["code"], grpc.StatusCode.UNKNOWN),
                    error["reason"],
                    error["message"],
                )
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def _recv_json(conn: socket.socket) -> dict[str, Any]:
    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the daemon closed the fd socket mid-message")
            out += chunk
        return out

    (n,) = struct.unpack("<I", exact(4))
    value = json.loads(exact(n))
    if not isinstance(value, dict):
        raise ValueError("bad answer on the fd socket")
    return value
