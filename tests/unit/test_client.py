"""torpor.Client and torpor.errors against a real in-process gRPC server on a Unix socket.

The server is the small fake of torpord's ModelService/NodeService in
fake_daemon.py: canned models, and failures aborted exactly as the daemon aborts
them (a google.rpc.Status carrying an ErrorInfo).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from torpor.client import Client, ModelWatch, default_socket_path
from torpor.errors import DAEMON_UNAVAILABLE, TorporError, from_rpc_error
from torpor.v1 import common_pb2, models_pb2

from .fake_daemon import GIB, Daemon


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


@pytest.fixture
def daemon_models() -> dict[str, common_pb2.Model]:
    return {"llama": make_model()}


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
