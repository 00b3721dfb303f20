"""The engine protocol's domain messages to torpor.v1 and back, as the
Attach servicer sends and reads them (torpord.server.services)."""

from __future__ import annotations

from torpor.v1 import agent_pb2
from torpord.core.attachments.messages import Hello, Quiesce, Resume
from torpord.server.services import hello_from_proto, message_to_proto


def test_quiesce_carries_its_timeout_as_a_duration() -> None:
    sent = message_to_proto(Quiesce(sequence=3, layers=("pre", "layers.0"), timeout=0.3))
    assert sent.WhichOneof("message") == "quiesce"
    assert sent.quiesce.sequence == 3
    assert list(sent.quiesce.layers) == ["pre", "layers.0"]
    assert sent.quiesce.timeout.ToNanoseconds() == 300_000_000


def test_resume_carries_the_layout_hash() -> None:
    sent = message_to_proto(Resume(sequence=4, layers=("post",), layout_hash="abc"))
    assert sent.WhichOneof("message") == "resume"
    assert sent.resume == agent_pb2.Resume(sequence=4, layers=["post"], layout_hash="abc")


def test_hello_is_read_whole() -> None:
    hello = agent_pb2.Hello(model_id="m", pid=42, engine="vllm", rank=2)
    assert hello_from_proto(hello) == Hello(model_id="m", pid=42, engine="vllm", rank=2)
