"""The fd socket's wire format, shared by the daemon and the agent.

Each message is a 4-byte little-endian length, then that many bytes of one
JSON object. An engine sends one request per connection:

    {"attachment_id": str, "model_id": str, "layers": [str, ...]}
    {"attachment_id": str, "release": true}

and the daemon answers with one message: an export's header (followed by
its fds, which are not part of this format), `{"released": bool}`, or the
error answer `{"error": {"code": str, "reason": str, "message": str}}`
(`code`: a gRPC status code's name, `reason`: UPPER_SNAKE).

This module only frames and unframes; what a request may hold is the
daemon's to check, and each side keeps its own connection logic. Messages
are parsed within bounds (torpor.boundedjson), and nothing of a refused one
is quoted. It imports no gRPC: the daemon's lower layers may use it.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

from torpor.boundedjson import BoundedJSONError, loads

__all__ = [
    "PREFIX_BYTES",
    "FrameError",
    "WireError",
    "decode",
    "encode",
    "error_answer",
    "error_of",
    "frame_length",
    "recv_message",
]

PREFIX_BYTES = 4
_PREFIX = struct.Struct("<I")


class FrameError(ValueError):
    """A message that is not one bounded JSON object; the text quotes none of it."""


@dataclass(frozen=True)
class WireError:
    """An error answer: what the daemon raised, as the gRPC API would say it."""

    code: str
    reason: str
    message: str


def encode(value: dict[str, Any]) -> bytes:
    """One message: the length prefix and the JSON of `value`."""
    body = json.dumps(value).encode()
    if len(body) >= 1 << 32:
        raise FrameError(f"a message of {len(body)} bytes does not fit the 4-byte length")
    return _PREFIX.pack(len(body)) + body


def frame_length(prefix: bytes | bytearray) -> int:
    """The body's length in a message's first PREFIX_BYTES bytes."""
    (size,) = _PREFIX.unpack_from(prefix)
    return int(size)


def decode(
    body: bytes, *, max_bytes: int, max_depth: int, what: str = "the message"
) -> dict[str, Any]:
    """A message's body (without its prefix): the JSON object it holds, parsed
    within the bounds; FrameError (naming it `what`) otherwise."""
    try:
        value = loads(body, max_bytes=max_bytes, max_depth=max_depth)
    except BoundedJSONError as err:  # (its message quotes nothing)
        raise FrameError(f"{what} is not valid: {err}") from None
    if not isinstance(value, dict):
        raise FrameError(f"{what} must be a JSON object")
    return value


def error_answer(code: str, reason: str, message: str) -> dict[str, Any]:
    """The answer that carries an error (the caller bounds `message`)."""
    return {"error": {"code": code, "reason": reason, "message": message}}


def error_of(answer: dict[str, Any]) -> WireError | None:
    """The error an answer carries, or None for any other answer; FrameError
    if its "error" is not the three strings."""
    error = answer.get("error")
    if error is None:
        return None
    if not isinstance(error, dict):
        raise FrameError("an error answer must hold an object")
    fields = [error.get(key) for key in ("code", "reason", "message")]
    if not all(isinstance(field, str) for field in fields):
        raise FrameError("an error answer needs code, reason and message strings")
    code, reason, message = fields
    return WireError(str(code), str(reason), str(message))


def recv_message(conn: socket.socket, *, max_bytes: int, max_depth: int) -> dict[str, Any]:
    """Read one whole message from a blocking socket; ConnectionError if the
    peer closes mid-message, FrameError if it is over the bounds or not an
    object (a body over `max_bytes` is refused before it is read)."""
    size = frame_length(_exact(conn, PREFIX_BYTES))
    if size > max_bytes:
        raise FrameError(f"a message of {size} bytes, more than the {max_bytes} allowed")
    return decode(_exact(conn, size), max_bytes=max_bytes, max_depth=max_depth)


def _exact(conn: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = conn.recv(min(n - len(out), 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the fd socket mid-message")
        out += chunk
    return bytes(out)
