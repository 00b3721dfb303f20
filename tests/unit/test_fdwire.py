"""The fd socket's wire codec (torpor.fdwire), shared by the daemon's fd
socket and the agent: each end's messages read back at the other."""

from __future__ import annotations

import json
import socket
import struct
import threading

import pytest
from torpor import fdwire
from torpord.errors import InvalidArgument, Unavailable
from torpord.server.fdwire import MAX_REQUEST, parse_request, send_error, send_json

SECRET = "s3cr3t-value"


def test_a_message_round_trips() -> None:
    value = {"attachment_id": "a" * 32, "layers": ["l0", "l1"], "nested": {"n": [1, 2.5]}}
    message = fdwire.encode(value)
    size = fdwire.frame_length(message[: fdwire.PREFIX_BYTES])
    assert size == len(message) - fdwire.PREFIX_BYTES
    body = message[fdwire.PREFIX_BYTES :]
    assert fdwire.decode(body, max_bytes=size, max_depth=3) == value


def test_the_prefix_is_four_bytes_little_endian() -> None:
    message = fdwire.encode({})
    assert message == struct.pack("<I", 2) + b"{}"
    assert fdwire.frame_length(bytearray(b"\x01\x02\x00\x00")) == 0x0201


def test_an_error_answer_round_trips() -> None:
    answer = fdwire.error_answer("NOT_FOUND", "MODEL_NOT_FOUND", "no model 'm'")
    body = fdwire.encode(answer)[fdwire.PREFIX_BYTES :]
    read = fdwire.decode(body, max_bytes=len(body), max_depth=2)
    assert fdwire.error_of(read) == fdwire.WireError("NOT_FOUND", "MODEL_NOT_FOUND", "no model 'm'")


def test_an_answer_without_error_is_not_one() -> None:
    assert fdwire.error_of({"released": True}) is None
    assert fdwire.error_of({"layers": [], "fd_count": 0}) is None


@pytest.mark.parametrize(
    "error",
    [[], "text", {"code": "NOT_FOUND", "reason": "R"}, {"code": 5, "reason": "R", "message": "m"}],
)
def test_a_malformed_error_answer_is_refused(error: object) -> None:
    with pytest.raises(fdwire.FrameError, match="error answer"):
        fdwire.error_of({"error": error})


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (json.dumps({"k": "v" * 100}).encode(), "more than the 64 allowed"),
        (b"[" * 10 + b"]" * 10, "nested deeper than 4 levels"),
        (json.dumps([SECRET]).encode(), "must be a JSON object"),
        (f"{{{SECRET}".encode(), "not valid JSON"),
        (b'{"k": "\xff"}', "not UTF-8"),
        (b'{"k": 1, "k": 2}', "same key twice"),
        (b'{"k": NaN}', "NaN"),
    ],
)
def test_a_bad_body_is_refused_without_quoting_it(body: bytes, match: str) -> None:
    with pytest.raises(fdwire.FrameError, match=match) as caught:
        fdwire.decode(body, max_bytes=64, max_depth=4, what="the request")
    assert str(caught.value).startswith("the request ")
    assert SECRET not in str(caught.value)


def test_recv_message_reads_a_message_sent_in_pieces() -> None:
    message = fdwire.encode({"layers": [f"layer.{i}" for i in range(50_000)]})
    a, b = socket.socketpair()
    pieces = [message[:2], message[2:5], message[5:9], message[9:]]  # (the prefix split too)
    with a, b:
        sender = threading.Thread(target=lambda: [a.sendall(piece) for piece in pieces])
        sender.start()
        got = fdwire.recv_message(b, max_bytes=len(message), max_depth=2)
        sender.join()
    assert got["layers"][-1] == "layer.49999"


def test_recv_message_refuses_a_long_body_before_reading_it() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack("<I", 1 << 31))  # (no body follows: it is never read)
        with pytest.raises(fdwire.FrameError, match=f"{1 << 31} bytes, more than the 1024"):
            fdwire.recv_message(b, max_bytes=1024, max_depth=2)


@pytest.mark.parametrize("cut", [0, 2, fdwire.PREFIX_BYTES + 3])
def test_recv_message_says_when_the_peer_closes_mid_message(cut: int) -> None:
    message = fdwire.encode({"released": True})
    a, b = socket.socketpair()
    with b:
        with a:
            a.sendall(message[:cut])
        with pytest.raises(ConnectionError, match="mid-message"):
            fdwire.recv_message(b, max_bytes=1024, max_depth=2)


def test_the_daemons_answers_read_back_with_the_codec() -> None:
    """The daemon's send_json/send_error write what the agent's side reads."""
    a, b = socket.socketpair()
    with a, b:
        send_json(a, {"released": False})
        send_error(a, Unavailable("x" * 5000, reason="FD_SOCKET_BUSY"))
        assert fdwire.recv_message(b, max_bytes=1 << 16, max_depth=3) == {"released": False}
        error = fdwire.error_of(fdwire.recv_message(b, max_bytes=1 << 16, max_depth=3))
    assert error is not None
    assert (error.code, error.reason) == ("UNAVAILABLE", "FD_SOCKET_BUSY")
    assert len(error.message.encode()) <= 1024  # (bounded as a gRPC status's)


def test_the_agents_requests_parse_at_the_daemon() -> None:
    request = {"attachment_id": "a" * 32, "model_id": "m", "layers": ["l0", "l1"]}
    body = fdwire.encode(request)[fdwire.PREFIX_BYTES :]
    parsed = parse_request(body)
    assert (parsed.attachment_id, parsed.model_id, parsed.layers) == ("a" * 32, "m", ("l0", "l1"))
    release = parse_request(fdwire.encode({"attachment_id": "a", "release": True})[4:])
    assert release.release


def test_the_daemon_refuses_a_request_over_its_bound_as_bad_request() -> None:
    body = fdwire.encode({"layers": [SECRET] * (MAX_REQUEST // len(SECRET))})[4:]
    with pytest.raises(InvalidArgument, match="the request is not valid") as caught:
        parse_request(body)
    assert caught.value.reason == "BAD_REQUEST"
    assert SECRET not in caught.value.message
