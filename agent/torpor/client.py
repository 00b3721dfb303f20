"""A synchronous client for torpord's gRPC API.

    with Client() as client:                      # the default socket
        model = client.load_model("llama", "/models/llama-3-8b")
        client.sleep_model("llama", level=1)
        for event in client.watch_models("llama"):
            ...

Every method returns the proto message it is about (`Model`, `Node`, a list
of `Model`) and raises `TorporError` for every failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from types import TracebackType
from typing import Self, TypeVar

import grpc

from torpor._catalogue_calls import CatalogueCalls
from torpor.errors import DAEMON_UNAVAILABLE, TorporError, from_rpc_error
from torpor.policy import make_policy
from torpor.socketpath import DEFAULT_ROOT_SOCKET, default_socket_path
from torpor.transport import SocketGuard, tcp_channel
from torpor.v1 import common_pb2, models_pb2, models_pb2_grpc, node_pb2, node_pb2_grpc
from torpor.watch import ModelWatch

__all__ = ["DEFAULT_ROOT_SOCKET", "Client", "ModelWatch", "default_socket_path", "make_policy"]

# Messages can be large: a MODEL_VIEW_FULL model lists every tensor, and a
# big MoE checkpoint has tens of thousands of them.
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    # torpord is node-local: never route it through $http_proxy/$grpc_proxy.
    ("grpc.enable_http_proxy", 0),
]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class Client(CatalogueCalls):
    """A connection to torpord, over its Unix socket (the default) or TCP.

    `socket` is a Unix socket path and `address` a `host:port`; give at most
    one. With neither, the socket is `default_socket_path()`. `timeout` is the
    default deadline, in seconds, of every unary call (None: no deadline);
    methods that take a `timeout` override it. Mutations with `wait=True`
    block until the transition is done, so give them a deadline that fits the
    work or none. The client is thread-safe; close it (or use `with`).

    Over TCP, the credentials the daemon asks for: a bearer `token` (or a
    `token_file` holding it; not accessible by others), and/or TLS: `ca_cert`
    (the CA of the daemon's certificate) with `client_cert` and `client_key`
    for mutual TLS (PEM files). A token goes without TLS to a loopback
    address only. Bad combinations or files raise ValueError.

    Over a Unix socket no credentials are given; the socket's directory must
    be one nobody but its owner (you, root, or a service root made it for)
    could change, else TorporError with reason UNSAFE_SOCKET_DIR is raised,
    here or before a call (see torpor.socketpath).
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        address: str | None = None,
        timeout: float | None = None,
        *,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        ca_cert: str | os.PathLike[str] | None = None,
        client_cert: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
    ) -> None:
        if socket is not None and address is not None:
            raise ValueError("give a socket or an address, not both")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        credentials = {
            "token": token,
            "token_file": token_file,
            "ca_cert": ca_cert,
            "client_cert": client_cert,
            "client_key": client_key,
        }
        self.socket: str | None
        self.address: str | None
        self._guard: SocketGuard | None = None
        if address is not None:
            if not address:
                raise ValueError("address must not be empty")
            self.socket, self.address = None, address
            self.target = address
            channel = tcp_channel(
                address,
                _CHANNEL_OPTIONS,
                token=token,
                token_file=token_file,
                ca_cert=ca_cert,
                client_cert=client_cert,
                client_key=client_key,
            )
        else:
            given = [name for name, value in credentials.items() if value is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: credentials are for an address (TCP);"
                    " the Unix socket needs none"
                )
            path = os.fspath(socket) if socket is not None else default_socket_path()
            if not path:
                raise ValueError("socket path must not be empty")
            self.socket, self.address = path, None
            self.target = "unix:" + path
            self._guard = SocketGuard(path)
            channel = grpc.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self.timeout = timeout
        self._channel = channel
        self._models = models_pb2_grpc.ModelServiceStub(self._channel)
        self._node = node_pb2_grpc.NodeServiceStub(self._channel)
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel, for services this client does not wrap."""
        self._check_socket()
        return self._channel

    def _check_socket(self) -> None:
        if self._guard is not None:
            self._guard.check()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel is connected; TorporError(DAEMON_UNAVAILABLE) on timeout."""
        if self._guard is not None:
            self._guard.check(missing_ok=True)
        future = grpc.channel_ready_future(self._channel)
        try:
            future.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            future.cancel()
            raise TorporError(
                grpc.StatusCode.UNAVAILABLE,
                DAEMON_UNAVAILABLE,
                f"cannot reach torpord on {self._describe()} within {timeout:g}s"
                if timeout is not None
                else f"cannot reach torpord on {self._describe()}",
                {"target": self.target},
            ) from None
        self._check_socket()  # connected: no call was sent yet

    def close(self) -> None:
        """Close the channel; running calls are cancelled. Idempotent."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    def _describe(self) -> str:
        return f"socket {self.socket}" if self.socket is not None else f"address {self.address}"

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float | None,
    ) -> _Resp:
        self._check_socket()
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, target=self.target) from err

    # -- node ----------------------------------------------------------------

    def get_node(self, *, timeout: float | None = None) -> node_pb2.Node:
        """The node: devices, host pool, disk cache, allowed roots."""
        return self._unary(self._node.GetNode, node_pb2.GetNodeRequest(), timeout).node

    def get_stats(
        self,
        model_id: str = "",
        kind: common_pb2.TransitionKind.ValueType = common_pb2.TRANSITION_KIND_UNSPECIFIED,
        *,
        timeout: float | None = None,
    ) -> node_pb2.GetStatsResponse:
        """Counts and P50/P95/P99 durations of recent transitions and Acquires
        (of every model and each, or only `model_id`'s; only `kind`'s)."""
        request = node_pb2.GetStatsRequest(model_id=model_id, kind=kind)
        return self._unary(self._node.GetStats, request, timeout)

    # -- reading models --------------------------------------------------------

    def list_models(
        self,
        view: models_pb2.ModelView.ValueType = models_pb2.MODEL_VIEW_BASIC,
        *,
        fingerprint: str = "",
        registered: bool = False,
        timeout: float | None = None,
    ) -> list[common_pb2.Model]:
        """Every model, sorted by model_id; or only the image with `fingerprint`.
        `registered`: also the catalogue's models not loaded (UNLOADED)."""
        request = models_pb2.ListModelsRequest(
            view=view, fingerprint=fingerprint, registered=registered
        )
        return list(self._unary(self._models.ListModels, request, timeout).models)

    def get_model(
        self,
        model_id: str,
        view: models_pb2.ModelView.ValueType = models_pb2.MODEL_VIEW_BASIC,
        *,
        timeout: float | None = None,
    ) -> common_pb2.Model:
        """One model; MODEL_VIEW_FULL adds every layer's tensors."""
        request = models_pb2.GetModelRequest(model_id=model_id, view=view)
        return self._unary(self._models.GetModel, request, timeout).model

    def watch_models(self, model_id: str = "") -> ModelWatch:
        """Stream a snapshot, then every change (of one model, or of all).

        No deadline applies. Iterate the result; call its `cancel()` (or leave
        its `with` block) to stop. A `TorporError` with reason WATCH_OVERFLOW
        means the client fell behind: watch again.
        """
        self._check_socket()
        call = self._models.WatchModels(models_pb2.WatchModelsRequest(model_id=model_id))
        return ModelWatch(call, self.target)

    # -- mutations -------------------------------------------------------------

    def load_model(
        self,
        model_id: str,
        source: str | os.PathLike[str],
        *,
        device: str = "",
        target_tier: common_pb2.Tier.ValueType = common_pb2.TIER_DEVICE,
        wait: bool = True,
        request_id: str = "",
        timeout: float | None = None,
        policy: common_pb2.Policy | None = None,
    ) -> common_pb2.Model:
        """Read a checkpoint into slabs on `device` (a UUID; empty: the freest).

        `target_tier=TIER_HOST` preloads into the host pool and leaves the
        model asleep at level 1. The source path is sent as given; it is
        resolved by the daemon, so pass an absolute path ("": a registered
        model's source). `policy` (see make_policy): its fields set win over
        the model's catalogue entry's and the daemon's defaults.
        """
        request = models_pb2.LoadModelRequest(
            model_id=model_id,
            source=os.fspath(source),
            device=device,
            target_tier=target_tier,
            wait=wait,
            request_id=request_id,
            policy=policy,
        )
        return self._unary(self._models.LoadModel, request, timeout).model

    def sleep_model(
        self,
        model_id: str,
        level: int = 1,
        *,
        wait: bool = True,
        request_id: str = "",
        timeout: float | None = None,
        disk_copy: bool = False,
    ) -> common_pb2.Model:
        """Free the model's device memory: level 1 keeps weights in HOST, 2 drops them
        (`disk_copy`: keeping a copy in the disk cache)."""
        request = models_pb2.SleepModelRequest(
            model_id=model_id, level=level, wait=wait, request_id=request_id, disk_copy=disk_copy
        )
        return self._unary(self._models.SleepModel, request, timeout).model

    def wake_model(
        self,
        model_id: str,
        *,
        wait: bool = True,
        request_id: str = "",
        timeout: float | None = None,
        verify: bool = False,
    ) -> common_pb2.Model:
        """Bring every layer back to the model's device (`verify`: check each
        slab against its checksum as it lands)."""
        request = models_pb2.WakeModelRequest(
            model_id=model_id, wait=wait, request_id=request_id, verify=verify
        )
        return self._unary(self._models.WakeModel, request, timeout).model

    def offload_model(
        self,
        model_id: str,
        layers: Iterable[str] = (),
        tier: common_pb2.Tier.ValueType = common_pb2.TIER_HOST,
        *,
        wait: bool = True,
        request_id: str = "",
        timeout: float | None = None,
        verify: bool = False,
    ) -> common_pb2.Model:
        """Move layers (`pre`, `layers.N`, `post`; none: all) to TIER_HOST or TIER_DEVICE
        (`verify`: check each slab that lands on the device)."""
        if isinstance(layers, str):
            raise TypeError("layers must be an iterable of layer names, not a str")
        request = models_pb2.OffloadModelRequest(
            model_id=model_id,
            layers=list(layers),
            tier=tier,
            wait=wait,
            request_id=request_id,
            verify=verify,
        )
        return self._unary(self._models.OffloadModel, request, timeout).model

    def unload_model(
        self,
        model_id: str,
        *,
        wait: bool = True,
        request_id: str = "",
        force: bool = False,
        timeout: float | None = None,
    ) -> common_pb2.Model:
        """Free every slab and forget the model; returns it as it was last.
        `force`: cancel a transition in progress first (else ABORTED)."""
        request = models_pb2.UnloadModelRequest(
            model_id=model_id, wait=wait, request_id=request_id, force=force
        )
        return self._unary(self._models.UnloadModel, request, timeout).model
