"""The agent's side of the daemon's fd socket: one request per connection
(torpor.fdwire), answered with a header and, for the slabs of an
attachment, their fds (SCM_RIGHTS)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc

from torpor import fdwire
from torpor.errors import TorporError

__all__ = ["request_fds", "request_release"]

# An answer lists the model's layers; this is far above any model's and
# keeps a broken peer from making the agent read gigabytes.
MAX_ANSWER = 1 << 28
MAX_ANSWER_DEPTH = 8  # (a header nests 3 deep: an object of lists of objects)


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
    message = fdwire.encode(request)
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            try:
                conn.connect(fd_socket)
                conn.sendall(message)
                answer = fdwire.recv_message(conn, max_bytes=MAX_ANSWER, max_depth=MAX_ANSWER_DEPTH)
            except BlockingIOError:  # (a Unix socket's full backlog, with a timeout set)
                answer = fdwire.error_answer(
                    "UNAVAILABLE", "FD_SOCKET_BUSY", "the fd socket's backlog is full"
                )
            error = fdwire.error_of(answer)
            if error is None:
                yield conn, answer
                return
            if error.reason != "FD_SOCKET_BUSY" or time.monotonic() + pause > deadline:
                raise TorporError(
                    getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN),
                    error.reason,
                    error.message,
                )
        time.sleep(pause)
        pause = min(pause * 2, 0.5)
