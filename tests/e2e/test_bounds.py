"""What comes in over gRPC is bounded before any work: oversized fields and
undecodable bytes get INVALID_ARGUMENT with their reason, errors that echo
the caller stay small, and neither memory nor the log grows with the input."""

from __future__ import annotations

import json
import queue
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from torpor.testing import make_checkpoint
from torpor.v1 import agent_pb2, agent_pb2_grpc, common_pb2, models_pb2, models_pb2_grpc

from .conftest import GRPCURL, Daemon

MiB = 1 << 20
# Well under a client's 8 KiB metadata limit (the message counted three
# times over: it is percent-encoded in grpc-message, and in the details too).
SMALL_TRAILERS = 4096


def proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


class Refusal:
    """An RPC error as a client sees it: code, ErrorInfo, trailer size."""

    def __init__(self, err: grpc.RpcError) -> None:
        call: Any = err
        self.code: grpc.StatusCode = call.code()
        self.message: str = call.details() or ""
        trailers = call.trailing_metadata() or ()
        self.trailer_bytes = len(self.message.encode()) + sum(len(k) + len(v) for k, v in trailers)
        status = rpc_status.from_call(call)
        self.reason = ""
        self.metadata: dict[str, str] = {}
        for detail in status.details if status is not None else ():
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                self.reason, self.metadata = info.reason, dict(info.metadata)


def refused(call: Any, request: Any) -> Refusal:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60)
    return Refusal(caught.value)


@pytest.fixture
def channel(daemon: Daemon) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(
        f"unix:{daemon.socket}", options=[("grpc.max_send_message_length", 8 * MiB)]
    ) as ch:
        yield ch


def test_oversized_fields_are_refused_naming_field_and_limit(
    daemon: Daemon, channel: grpc.Channel
) -> None:
    models = models_pb2_grpc.ModelServiceStub(channel)
    huge = "x" * (3 * MiB)
    cases: list[tuple[Any, Any, str, str, str]] = [
        # (call, request, reason, field, limit)
        (models.SleepModel, models_pb2.SleepModelRequest(model_id="m", request_id=huge),
         "FIELD_TOO_LONG", "request_id", "128"),
        (models.LoadModel, models_pb2.LoadModelRequest(model_id="m", source="/" + huge),
         "FIELD_TOO_LONG", "source", "4096"),
        (models.GetModel, models_pb2.GetModelRequest(model_id=huge),
         "FIELD_TOO_LONG", "model_id", "256"),
        (models.OffloadModel,
         models_pb2.OffloadModelRequest(model_id="m", layers=[f"l{i}" for i in range(100_000)]),
         "TOO_MANY_ITEMS", "layers", "4096"),
        (models.OffloadModel, models_pb2.OffloadModelRequest(model_id="m", layers=["a", huge]),
         "FIELD_TOO_LONG", "layers[1]", "256"),
    ]  # fmt: skip
    for call, request, reason, field, limit in cases:
        got = refused(call, request)
        assert (got.code, got.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason), got.message
        assert (got.metadata["field"], got.metadata["limit"]) == (field, limit)
        assert "xxxxxxxx" not in got.message and got.trailer_bytes < SMALL_TRAILERS
    # The Attach stream's messages are bounded too.
    agents = agent_pb2_grpc.AgentServiceStub(channel)
    hello = agent_pb2.Hello(model_id="m", pid=1, engine=huge)
    got = refused(lambda r, timeout: list(agents.Attach(iter([r]), timeout=timeout)),
                  agent_pb2.AttachRequest(hello=hello))  # fmt: skip
    assert (got.code, got.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "FIELD_TOO_LONG")
    assert got.metadata["field"] == "hello.engine"


def test_grpcurl_gets_the_reason_for_a_3_mib_request_id(daemon: Daemon) -> None:
    body = json.dumps({"model_id": "m", "request_id": "x" * (3 * MiB)})
    out = subprocess.run(
        [GRPCURL, "-plaintext", "-unix", "-format-error", "-max-msg-sz", str(8 * MiB),
         "-d", "@", str(daemon.socket), "torpor.v1.ModelService/WakeModel"],
        input=body, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0
    status = json.loads(out.stderr)
    assert status["code"] == 3  # INVALID_ARGUMENT
    assert status["details"][0]["reason"] == "FIELD_TOO_LONG"
    assert status["details"][0]["metadata"] == {
        "field": "request_id",
        "limit": "128",
        "size": str(3 * MiB),
    }


def test_errors_that_list_caller_input_stay_small(daemon: Daemon, channel: grpc.Channel) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=2)
    daemon.ctl("load", "m", str(ckpt))
    models = models_pb2_grpc.ModelServiceStub(channel)
    # Within every bound, yet ~1 MB of names: once all echoed in the status,
    # which the client refused as RESOURCE_EXHAUSTED without a reason.
    names = [f"{i:06d}".ljust(250, "n") for i in range(4000)]
    got = refused(models.OffloadModel, models_pb2.OffloadModelRequest(model_id="m", layers=names))
    assert (got.code, got.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_LAYER")
    assert "and 3,995 more" in got.message and got.metadata["count"] == "4000"
    assert got.trailer_bytes < SMALL_TRAILERS
    # An error that echoes a long (but allowed) path is cut to fit.
    relative = "a/" * 2000
    got = refused(models.LoadModel, models_pb2.LoadModelRequest(model_id="n", source=relative))
    assert (got.code, got.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "SOURCE_NOT_ABSOLUTE")
    assert got.trailer_bytes < SMALL_TRAILERS


def test_huge_request_ids_grow_neither_memory_nor_the_log(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=2)
    daemon.ctl("load", "m", str(ckpt))
    pid = daemon.proc.pid
    with grpc.insecure_channel(
        f"unix:{daemon.socket}", options=[("grpc.max_send_message_length", 8 * MiB)]
    ) as channel:
        models = models_pb2_grpc.ModelServiceStub(channel)
        models.SleepModel(
            models_pb2.SleepModelRequest(model_id="m", level=1, wait=True), timeout=60
        )
        models.WakeModel(models_pb2.WakeModelRequest(model_id="m", wait=True), timeout=60)
        rss, log_size = proc_status(pid, "VmRSS"), daemon.log_path.stat().st_size
        # Each would start a transition (to be remembered for ten minutes and
        # logged) were its id not refused first.
        for i in range(32):
            huge = f"{i:04d}".ljust(3 * MiB, "x")
            for call, request in (
                (models.SleepModel, models_pb2.SleepModelRequest(model_id="m", request_id=huge)),
                (models.WakeModel, models_pb2.WakeModelRequest(model_id="m", request_id=huge)),
            ):
                assert refused(call, request).reason == "FIELD_TOO_LONG"
        grown_kib = proc_status(pid, "VmRSS") - rss
        assert grown_kib < 96 * 1024, f"RSS grew {grown_kib} KiB for 192 MiB of refused ids"
        assert daemon.log_path.stat().st_size - log_size < 64 * 1024
        assert models.GetModel(models_pb2.GetModelRequest(model_id="m")).model.state == (
            common_pb2.MODEL_STATE_ACTIVE
        )


METHODS = [
    ("unary", "/torpor.v1.ModelService/LoadModel"),
    ("unary", "/torpor.v1.ModelService/SleepModel"),
    ("unary", "/torpor.v1.ModelService/WakeModel"),
    ("unary", "/torpor.v1.ModelService/OffloadModel"),
    ("unary", "/torpor.v1.ModelService/UnloadModel"),
    ("unary", "/torpor.v1.ModelService/GetModel"),
    ("unary", "/torpor.v1.ModelService/ListModels"),
    ("server_stream", "/torpor.v1.ModelService/WatchModels"),
    ("unary", "/torpor.v1.NodeService/GetNode"),
    ("stream", "/torpor.v1.AgentService/Attach"),
    ("unary", "/grpc.health.v1.Health/Check"),
    ("server_stream", "/grpc.health.v1.Health/Watch"),
    ("stream", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
]
GARBAGE = b"\xff\xff\xff\x0f"  # a field tag that never ends


def send_garbage(channel: grpc.Channel, kind: str, method: str) -> Refusal:
    with pytest.raises(grpc.RpcError) as caught:
        if kind == "unary":
            channel.unary_unary(method)(GARBAGE, timeout=30)
        elif kind == "server_stream":
            list(channel.unary_stream(method)(GARBAGE, timeout=30))
        else:
            requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
            requests.put(GARBAGE)  # (and the stream stays open: the server ends it)
            list(channel.stream_stream(method)(iter(requests.get, None), timeout=30))
    return Refusal(caught.value)


def test_undecodable_requests_are_invalid_argument_and_logged_at_a_bounded_rate(
    daemon: Daemon, channel: grpc.Channel
) -> None:
    for kind, method in METHODS:
        got = send_garbage(channel, kind, method)
        assert (got.code, got.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
        assert got.metadata["method"] == method
    for _ in range(10):
        for kind, method in METHODS:
            send_garbage(channel, kind, method)
    # 143 refusals: the first few logged, then a count; no tracebacks.
    log = daemon.log()
    lines = [line for line in log.splitlines() if "request refused" in line]
    assert 1 <= len(lines) <= 12
    assert "Traceback" not in log and '"level": "error"' not in log
    # The daemon still answers.
    assert daemon.call("torpor.v1.ModelService/ListModels") == {}
