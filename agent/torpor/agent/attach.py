"""Attach an engine to a model the daemon holds and get its weights as tensors.

    from torpor.agent import attach

    with attach("llama") as model:
        state_dict = model.state_dict()   # name -> tensor, views on the daemon's slabs
        module.load_state_dict(state_dict, assign=True)

Nothing is copied: each layer's slab is mapped read-only at an address this
process reserved for it, and the tensors are views on those mappings (host
backend). The attachment lasts until close(); tensors must not be used after
it. While an engine is attached, the daemon refuses to sleep, offload or
unload the model (the sleep protocol that lets engines let go and come back
at the same addresses arrives next).
"""

from __future__ import annotations

import json
import os
import queue
import socket
import struct
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import grpc

from torpor.agent.mapping import SlabRange
from torpor.client import Client
from torpor.errors import TorporError, from_rpc_error
from torpor.v1 import agent_pb2, agent_pb2_grpc, models_pb2

if TYPE_CHECKING:
    import torch

__all__ = ["AttachedModel", "attach", "request_fds"]


class AttachedModel:
    """One engine's attachment to one model."""

    def __init__(
        self,
        model_id: str,
        *,
        client: Client | None = None,
        engine: str = "",
        rank: int = 0,
        timeout: float = 60.0,
    ) -> None:
        self.model_id = model_id
        self._own_client = client is None
        self.client = client or Client()
        self._requests: queue.SimpleQueue[agent_pb2.AttachRequest | None] = queue.SimpleQueue()
        self._requests.put(
            agent_pb2.AttachRequest(
                hello=agent_pb2.Hello(model_id=model_id, pid=os.getpid(), engine=engine, rank=rank)
            )
        )
        stub = agent_pb2_grpc.AgentServiceStub(self.client.channel)
        # grpc-stubs types the stream as a CallIterator without __next__; it has one.
        self._call: Any = cast(Any, stub.Attach(iter(self._requests.get, None)))
        self.ranges: dict[str, SlabRange] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        try:
            first = next(self._call)
            attached = first.attached
            self.attachment_id = attached.attachment_id
            self.layout_hash = attached.layout_hash
            self._listener = threading.Thread(target=self._listen, daemon=True)
            self._listener.start()
            self._map(attached.fd_socket, timeout)
        except grpc.RpcError as err:
            self.close()
            raise from_rpc_error(err) from None
        except BaseException:
            self.close()
            raise

    def _listen(self) -> None:
        # Instructions from the daemon (quiesce/resume) arrive with the sleep
        # protocol; until then the stream only tells us when the daemon goes.
        try:
            for _ in self._call:
                pass
        except grpc.RpcError:
            pass

    def _map(self, fd_socket: str, timeout: float) -> None:
        model = self.client.get_model(self.model_id, view=models_pb2.MODEL_VIEW_FULL)
        header, fds = request_fds(fd_socket, self.attachment_id, timeout=timeout)
        try:
            sizes = {layer["name"]: layer["size"] for layer in header["layers"]}
            for layer, fd in zip(header["layers"], fds, strict=True):
                r = SlabRange(int(layer["size"]))
                self.ranges[layer["name"]] = r
                r.map(fd)
        finally:
            for fd in fds:
                os.close(fd)
        for layer in model.layers:
            r = self.ranges[layer.name]
            if sizes[layer.name] != layer.size_bytes:
                raise TorporError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "LAYOUT_CHANGED",
                    f"layer {layer.name} is {sizes[layer.name]} bytes, the manifest says"
                    f" {layer.size_bytes}",
                )
            for t in layer.tensors:
                self._tensors[t.name] = r.tensor(t.slab_offset, t.dtype, list(t.shape))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the model by name: views on the daemon's slabs."""
        return dict(self._tensors)

    def close(self) -> None:
        """Detach. The tensors from state_dict() must not be used after this."""
        self._requests.put(None)
        if hasattr(self, "_call"):
            self._call.cancel()
        for r in self.ranges.values():
            r.release()
        self.ranges.clear()
        self._tensors.clear()
        if self._own_client:
            self.client.close()

    def __enter__(self) -> AttachedModel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def attach(model_id: str, **kwargs: Any) -> AttachedModel:
    """Attach this process to a model (see AttachedModel)."""
    return AttachedModel(model_id, **kwargs)


def request_fds(
    fd_socket: str, attachment_id: str, layers: list[str] | None = None, *, timeout: float = 60.0
) -> tuple[dict[str, Any], list[int]]:
    """Ask the daemon's fd socket for the slabs of an attachment: (header, fds)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(fd_socket)
        body = json.dumps({"attachment_id": attachment_id, "layers": layers or []}).encode()
        conn.sendall(struct.pack("<I", len(body)) + body)
        header = _recv_json(conn)
        if "error" in header:
            error = header["error"]
            raise TorporError(
                getattr(grpc.StatusCode, error["code"], grpc.StatusCode.UNKNOWN),
                error["reason"],
                error["message"],
            )
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


def _recv_json(conn: socket.socket) -> dict[str, Any]:
    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the daemon closed the fd socket mid-message")
            out += chunk
        return out

    (n,) = struct.unpack("<I", exact(4))
    value = json.loads(exact(n))
    if not isinstance(value, dict):
        raise ValueError("bad answer on the fd socket")
    return value
