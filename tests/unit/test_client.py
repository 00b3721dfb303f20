"""torpor.Client and torpor.errors against a real in-process gRPC server on a Unix socket.

The server is a small fake of torpord's ModelService/NodeService: canned
models, and failures aborted exactly as the daemon aborts them (a
google.rpc.Status carrying an ErrorInfo).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from torpor.client import Client, ModelWatch, default_socket_path
from torpor.errors import DAEMON_UNAVAILABLE, TorporError, from_rpc_error
from torpor.v1 import common_pb2, models_pb2, models_pb2_grpc, node_pb2, node_pb2_grpc

GIB = 1024**3


def abort(
    context: grpc.ServicerContext,
    code: int,
    reason: str,
    message: str,
    **metadata: str,
) -> None:
    """Abort as torpord does: a google.rpc.Status with an ErrorInfo detail."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="torpor.dev", metadata=metadata))
    status = status_pb2.Status(code=code, message=message, details=[detail])
    context.abort_with_status(rpc_status.to_status(status))


def make_model(model_id: str = "llama") -> common_pb2.Model:
    tiers = [common_pb2.TIER_DEVICE, common_pb2.TIER_DEVICE, common_pb2.TIER_HOST]
    names = ["pre", "layers.0", "post"]
    layers = [
        common_pb2.Layer(
            name=name,
            index=i,
            size_bytes=GIB + GIB // 2,
            tier=tier,
            device="devices/GPU-1234" if tier == common_pb2.TIER_DEVICE else "",
            checksum=f"{i:016x}",
        )
        for i, (name, tier) in enumerate(zip(names, tiers, strict=True))
    ]
    return common_pb2.Model(
        name=f"models/{model_id}",
        model_id=model_id,
        state=common_pb2.MODEL_STATE_OFFLOADED,
        device="devices/GPU-1234",
        bytes=common_pb2.TierBytes(device_bytes=3 * GIB, host_bytes=GIB + GIB // 2),
        layers=layers,
    )


@dataclass
class FakeModels(models_pb2_grpc.ModelServiceServicer):
    models: dict[str, common_pb2.Model] = field(default_factory=dict)
    requests: list[object] = field(default_factory=list)
    events: list[models_pb2.ModelEvent] = field(default_factory=list)
    hold_watch: bool = False

    def _get(self, model_id: str, context: grpc.ServicerContext) -> common_pb2.Model:
        if model_id not in self.models:
            abort(
                context,
                code_pb2.NOT_FOUND,
                "MODEL_NOT_FOUND",
                f"model {model_id!r} not found",
                model_id=model_id,
            )
        return self.models[model_id]

    def GetModel(
        self, request: models_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.GetModelResponse:
        self.requests.append(request)
        return models_pb2.GetModelResponse(model=self._get(request.model_id, context))

    def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        self.requests.append(request)
        return models_pb2.ListModelsResponse(models=[self.models[k] for k in sorted(self.models)])

    def LoadModel(
        self, request: models_pb2.LoadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.LoadModelResponse:
        self.requests.append(request)
        if request.source == "/plain-error":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no error info here")
        if request.source == "/shutting-down":
            abort(context, code_pb2.UNAVAILABLE, "SHUTTING_DOWN", "torpord is stopping")
        model = make_model(request.model_id)
        self.models[request.model_id] = model
        return models_pb2.LoadModelResponse(model=model)

    def SleepModel(
        self, request: models_pb2.SleepModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.SleepModelResponse:
        self.requests.append(request)
        model = self._get(request.model_id, context)
        model.state = common_pb2.MODEL_STATE_ASLEEP
        model.sleep_level = request.level
        return models_pb2.SleepModelResponse(model=model)

    def WakeModel(
        self, request: models_pb2.WakeModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.WakeModelResponse:
        self.requests.append(request)
        model = self._get(request.model_id, context)
        model.state = common_pb2.MODEL_STATE_ACTIVE
        model.sleep_level = 0
        return models_pb2.WakeModelResponse(model=model)

    def OffloadModel(
        self, request: models_pb2.OffloadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.OffloadModelResponse:
        self.requests.append(request)
        return models_pb2.OffloadModelResponse(model=self._get(request.model_id, context))

    def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.UnloadModelResponse:
        self.requests.append(request)
        model = self._get(request.model_id, context)
        del self.models[request.model_id]
        return models_pb2.UnloadModelResponse(model=model)

    def WatchModels(
        self, request: models_pb2.WatchModelsRequest, context: grpc.ServicerContext
    ) -> Iterator[models_pb2.WatchModelsResponse]:
        self.requests.append(request)
        snapshot = [m for k, m in sorted(self.models.items()) if request.model_id in ("", k)]
        yield models_pb2.WatchModelsResponse(snapshot=models_pb2.Snapshot(models=snapshot))
        for event in self.events:
            yield models_pb2.WatchModelsResponse(model_event=event)
        while self.hold_watch and context.is_active():
            time.sleep(0.01)


class FakeNode(node_pb2_grpc.NodeServiceServicer):
    def GetNode(
        self, request: node_pb2.GetNodeRequest, context: grpc.ServicerContext
    ) -> node_pb2.GetNodeResponse:
        return node_pb2.GetNodeResponse(node=node_pb2.Node(hostname="gpu-1", model_count=1))


@dataclass
class Daemon:
    socket: Path
    port: int
    models: FakeModels


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    socket = tmp_path / "t.sock"
    executor = futures.ThreadPoolExecutor(max_workers=8)
    server = grpc.server(executor)
    fake = FakeModels(models={"llama": make_model()})
    models_pb2_grpc.add_ModelServiceServicer_to_server(fake, server)
    node_pb2_grpc.add_NodeServiceServicer_to_server(FakeNode(), server)
    server.add_insecure_port(f"unix:{socket}")
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Daemon(socket, port, fake)
    finally:
        server.stop(None).wait()
        executor.shutdown(wait=True)


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with Client(socket=daemon.socket, timeout=10) as c:
        yield c


# -- the default socket --------------------------------------------------------


def test_default_socket_prefers_torpor_socket() -> None:
    env = {"TORPOR_SOCKET": "/x/t.sock", "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert default_socket_path(env, euid=0) == "/x/t.sock"
    assert default_socket_path(env, euid=1000) == "/x/t.sock"


def test_default_socket_for_root_ignores_xdg() -> None:
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/0"}, euid=0) == (
        "/run/torpor/torpor.sock"
    )


def test_default_socket_for_a_user() -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert default_socket_path(env, euid=1000) == "/run/user/1000/torpor/torpor.sock"
    assert default_socket_path({}, euid=1000) == "/tmp/torpor-1000/torpor.sock"
    # Set but empty counts as unset.
    assert default_socket_path({"TORPOR_SOCKET": "", "XDG_RUNTIME_DIR": ""}, euid=7) == (
        "/tmp/torpor-7/torpor.sock"
    )


def test_client_uses_the_default_socket(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORPOR_SOCKET", str(daemon.socket))
    with Client() as c:
        assert c.socket == str(daemon.socket)
        assert c.target == f"unix:{daemon.socket}"
        assert c.get_model("llama").model_id == "llama"


def test_client_refuses_socket_and_address() -> None:
    with pytest.raises(ValueError, match="not both"):
        Client(socket="/tmp/x.sock", address="127.0.0.1:1")


# -- calls ---------------------------------------------------------------------


def test_reads(client: Client) -> None:
    assert client.get_node().hostname == "gpu-1"
    assert [m.model_id for m in client.list_models()] == ["llama"]
    model = client.get_model("llama", view=models_pb2.MODEL_VIEW_FULL)
    assert [layer.tier for layer in model.layers] == [
        common_pb2.TIER_DEVICE,
        common_pb2.TIER_DEVICE,
        common_pb2.TIER_HOST,
    ]


def test_over_tcp(daemon: Daemon) -> None:
    with Client(address=f"127.0.0.1:{daemon.port}") as c:
        assert c.get_node().hostname == "gpu-1"


def test_mutations_send_their_arguments(client: Client, daemon: Daemon) -> None:
    model = client.load_model(
        "qwen",
        Path("/models/qwen"),
        device="GPU-1234",
        target_tier=common_pb2.TIER_HOST,
        wait=False,
        request_id="r-1",
    )
    assert model.model_id == "qwen"
    assert client.sleep_model("qwen", 2, request_id="r-2").sleep_level == 2
    assert client.wake_model("qwen").state == common_pb2.MODEL_STATE_ACTIVE
    client.offload_model("qwen", ["layers.0", "post"], common_pb2.TIER_DEVICE, wait=False)
    assert client.unload_model("qwen").model_id == "qwen"
    load, sleep, wake, offload, unload = daemon.models.requests
    assert load == models_pb2.LoadModelRequest(
        model_id="qwen",
        source="/models/qwen",
        device="GPU-1234",
        target_tier=common_pb2.TIER_HOST,
        wait=False,
        request_id="r-1",
    )
    assert sleep == models_pb2.SleepModelRequest(
        model_id="qwen", level=2, wait=True, request_id="r-2"
    )
    assert wake == models_pb2.WakeModelRequest(model_id="qwen", wait=True)
    assert offload == models_pb2.OffloadModelRequest(
        model_id="qwen", layers=["layers.0", "post"], tier=common_pb2.TIER_DEVICE, wait=False
    )
    assert unload == models_pb2.UnloadModelRequest(model_id="qwen", wait=True)


def test_offload_refuses_a_bare_string(client: Client) -> None:
    with pytest.raises(TypeError):
        client.offload_model("llama", "layers.0")


# -- errors --------------------------------------------------------------------


def test_error_info_becomes_torpor_error(client: Client) -> None:
    with pytest.raises(TorporError) as caught:
        client.get_model("missing")
    err = caught.value
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.reason == "MODEL_NOT_FOUND"
    assert err.domain == "torpor.dev"
    assert err.metadata == {"model_id": "missing"}
    assert err.message == "model 'missing' not found"
    assert str(err) == err.message
    assert not err.unavailable
    assert isinstance(err.__cause__, grpc.RpcError)


def test_error_without_error_info_uses_the_code_name(client: Client) -> None:
    with pytest.raises(TorporError) as caught:
        client.load_model("x", "/plain-error")
    err = caught.value
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "FAILED_PRECONDITION"
    assert err.message == "no error info here"
    assert err.metadata == {}


def test_unavailable_from_the_daemon_keeps_its_reason(client: Client) -> None:
    with pytest.raises(TorporError) as caught:
        client.load_model("x", "/shutting-down")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "SHUTTING_DOWN"
    assert not caught.value.unavailable


def test_unreachable_socket_names_the_socket(tmp_path: Path) -> None:
    socket = tmp_path / "nobody-home.sock"
    with Client(socket=socket, timeout=5) as c, pytest.raises(TorporError) as caught:
        c.list_models()
    err = caught.value
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.reason == DAEMON_UNAVAILABLE
    assert err.unavailable
    assert f"socket {socket}" in err.message
    assert err.metadata == {"target": f"unix:{socket}"}


def test_from_rpc_error_without_a_target() -> None:
    class Bare(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "connection refused"

    err = from_rpc_error(Bare())
    assert err.reason == DAEMON_UNAVAILABLE
    assert err.message == "cannot reach torpord: connection refused"


def test_wait_ready(client: Client, tmp_path: Path) -> None:
    client.wait_ready(timeout=5)
    with Client(socket=tmp_path / "none.sock") as c, pytest.raises(TorporError) as caught:
        c.wait_ready(timeout=0.2)
    assert caught.value.reason == DAEMON_UNAVAILABLE
    assert "none.sock" in caught.value.message


# -- watch ---------------------------------------------------------------------


def test_watch_yields_snapshot_then_events_then_ends(client: Client, daemon: Daemon) -> None:
    changed = make_model()
    changed.state = common_pb2.MODEL_STATE_ACTIVE
    daemon.models.events = [
        models_pb2.ModelEvent(type=models_pb2.MODEL_EVENT_TYPE_CHANGED, model=changed),
        models_pb2.ModelEvent(type=models_pb2.MODEL_EVENT_TYPE_REMOVED, model=changed),
    ]
    with client.watch_models("llama") as watch:
        responses = list(watch)
    assert [r.WhichOneof("event") for r in responses] == ["snapshot", "model_event", "model_event"]
    assert [m.model_id for m in responses[0].snapshot.models] == ["llama"]
    assert responses[2].model_event.type == models_pb2.MODEL_EVENT_TYPE_REMOVED
    assert daemon.models.requests[-1] == models_pb2.WatchModelsRequest(model_id="llama")


def test_watch_cancel_from_another_thread_ends_iteration(client: Client, daemon: Daemon) -> None:
    daemon.models.hold_watch = True
    watch = client.watch_models()
    assert isinstance(watch, ModelWatch)
    assert next(watch).HasField("snapshot")
    timer = threading.Timer(0.1, watch.cancel)
    timer.start()
    try:
        assert list(watch) == []
    finally:
        timer.join()
    assert watch.cancelled


def test_watch_on_unreachable_socket_raises(tmp_path: Path) -> None:
    with Client(socket=tmp_path / "none.sock") as c:
        watch = c.watch_models()
        with pytest.raises(TorporError) as caught:
            next(watch)
    assert caught.value.reason == DAEMON_UNAVAILABLE
