"""The daemon's side of the fd socket's wire format (torpor.fdwire, shared
with the agent): what a request may hold, and answers from domain errors.

Unknown keys of a request are ignored; known ones are checked for type and
size (with the gRPC limits of torpord.server.limits) after the JSON is
parsed within bounds, and nothing of a refused request is quoted.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from torpor import fdwire

from torpord.errors import InvalidArgument, TorporError, clip
from torpord.server.errors import MAX_MESSAGE
from torpord.server.limits import DEFAULT_STRING, MAX_NAME, MAX_NAMES, too_long, too_many

__all__ = ["MAX_REQUEST", "FdRequest", "parse_request", "send_error", "send_json"]

MAX_REQUEST = 1 << 20  # bytes: MAX_NAMES names of MAX_NAME bytes fit
MAX_DEPTH = 4  # (a valid request nests 2 deep: an object holding a list)
MAX_ATTACHMENT_ID = 128  # (the daemon hands out 32 hex digits)


@dataclass(frozen=True)
class FdRequest:
    attachment_id: str
    model_id: str = ""
    layers: tuple[str, ...] = ()
    release: bool = False


def _string(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string", reason="BAD_REQUEST")
    size = len(value.encode(errors="backslashreplace"))
    if size > limit:
        raise too_long(name, size, limit)
    return value


def parse_request(body: bytes) -> FdRequest:
    """The request in `body`, checked; InvalidArgument (BAD_REQUEST,
    FIELD_TOO_LONG, TOO_MANY_ITEMS) otherwise, quoting none of it."""
    try:
        value = fdwire.decode(body, max_bytes=MAX_REQUEST, max_depth=MAX_DEPTH, what="the request")
    except fdwire.FrameError as err:  # (its message quotes nothing)
        raise InvalidArgument(str(err), reason="BAD_REQUEST") from None
    attachment_id = _string(value.get("attachment_id", ""), "attachment_id", MAX_ATTACHMENT_ID)
    model_id = _string(value.get("model_id", ""), "model_id", DEFAULT_STRING)
    release = value.get("release", False)
    if not isinstance(release, bool):
        raise InvalidArgument("release must be true or false", reason="BAD_REQUEST")
    layers = value.get("layers", [])
    if not isinstance(layers, list):
        raise InvalidArgument("layers must be a list of names", reason="BAD_REQUEST")
    if len(layers) > MAX_NAMES:
        raise too_many("layers", len(layers), MAX_NAMES)
    names = tuple(_string(name, f"layers[{i}]", MAX_NAME) for i, name in enumerate(layers))
    return FdRequest(attachment_id, model_id, names, release)


def send_error(conn: socket.socket, err: TorporError) -> None:
    message = clip(err.message, MAX_MESSAGE)  # (the same bound as a gRPC status's)
    send_json(conn, fdwire.error_answer(err.code.value, err.reason, message))


def send_json(conn: socket.socket, value: dict[str, Any]) -> None:
    conn.sendall(fdwire.encode(value))
