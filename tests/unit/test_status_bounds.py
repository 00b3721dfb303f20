"""A status fits in a client's trailers whatever an error echoes."""

from __future__ import annotations

from urllib.parse import quote

from google.rpc import error_details_pb2, status_pb2
from torpord.errors import InvalidArgument, clip, some
from torpord.server.errors import MAX_MESSAGE, status_for


def test_clip_cuts_at_a_character_and_escapes_lone_surrogates() -> None:
    assert clip("short", 10) == "short"
    assert clip("é" * 10, 8) == "éé…"  # 2 + 2 + 3 bytes: no half character
    assert len(clip("x" * 10_000, 100).encode()) == 100
    assert clip("a\ud800b", 100) == "a\\ud800b"  # encodable, so a status can carry it


def test_some_names_a_few_and_counts_the_rest() -> None:
    assert some(["a", "b"]) == "'a', 'b'"
    listed = some([f"layer{i}" for i in range(100_000)])
    assert listed.endswith("and 99,995 more") and len(listed) < 200
    assert len(some(["y" * 10_000], each=64)) < 80


def test_a_status_stays_small_whatever_the_error_holds() -> None:
    huge = "\u00e9" * 1_000_000  # two bytes each, three times that percent-encoded
    err = InvalidArgument(f"bad {huge}", reason="BAD", metadata={f"k{i}": huge for i in range(100)})
    status = status_for(err)
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert isinstance(details, bytes)
    on_the_wire = len(quote(status.details.encode(), safe="")) + len(details) * 4 // 3
    assert on_the_wire < 6 * 1024
    decoded = status_pb2.Status.FromString(details)
    assert len(decoded.message.encode()) <= MAX_MESSAGE
    info = error_details_pb2.ErrorInfo()
    assert decoded.details[0].Unpack(info)
    assert info.reason == "BAD" and "k0" in info.metadata
