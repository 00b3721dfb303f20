"""Engines attached to models: the Attach stream's registry and the fd socket.

A gRPC stream cannot carry file descriptors, so slabs travel over a second
Unix socket beside the daemon's (`<socket>.fds`). An engine first attaches
over gRPC (AgentService.Attach, saying which pid it is) and gets an
attachment id; it then asks the fd socket for the slabs with that id. The
daemon reads the asking process's pid from the socket itself (SO_PEERCRED)
and hands fds only to the process that attached. Requests and answers are
length-prefixed JSON; never pickle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from torpor.v1 import agent_pb2

from torpord.core.manager import ModelManager
from torpord.core.types import ModelState, Tier
from torpord.errors import FailedPrecondition, InvalidArgument, PermissionDenied, TorporError
from torpord.storage.layers import layout_hash

__all__ = ["AgentRegistry", "Attachment", "FdServer"]

log = structlog.get_logger("torpord.agents")

# The kernel passes at most 253 fds in one message.
FDS_PER_MESSAGE = 250
MAX_REQUEST = 1 << 20


@dataclass(frozen=True)
class Attachment:
    id: str
    pid: int
    model_id: str
    engine: str
    rank: int


class AgentRegistry:
    """Who is attached to what. Lives on the event loop."""

    def __init__(self, manager: ModelManager, fd_socket: Path) -> None:
        self.manager = manager
        self.fd_socket = fd_socket
        self._attachments: dict[str, Attachment] = {}
        manager.engines_attached = self.count

    def count(self, model_id: str) -> int:
        return sum(1 for a in self._attachments.values() if a.model_id == model_id)

    def attach(self, hello: agent_pb2.Hello) -> tuple[Attachment, str]:
        if hello.pid <= 0:
            raise InvalidArgument("hello.pid must be the engine's process id", reason="INVALID_PID")
        snapshot = self.manager.get(hello.model_id)
        if snapshot.state is not ModelState.ACTIVE:
            raise FailedPrecondition(
                f"model {hello.model_id!r} is {snapshot.state.value.lower()}; engines attach"
                " to an active model (wake it first)",
                reason="MODEL_NOT_ACTIVE",
                metadata={"model_id": hello.model_id, "state": snapshot.state.value},
            )
        attachment = Attachment(
            secrets.token_hex(16), hello.pid, hello.model_id, hello.engine, hello.rank
        )
        self._attachments[attachment.id] = attachment
        log.info("engine attached", model_id=hello.model_id, pid=hello.pid, engine=hello.engine)
        return attachment, layout_hash([layer.plan for layer in snapshot.layers])

    def detach(self, attachment_id: str) -> None:
        attachment = self._attachments.pop(attachment_id, None)
        if attachment is not None:
            log.info("engine detached", model_id=attachment.model_id, pid=attachment.pid)

    async def export(
        self, attachment_id: str, peer_pid: int, names: list[str]
    ) -> tuple[dict[str, Any], list[int]]:
        """The header and fresh fds of the asked layers (every layer if none),
        for the process that attached and no other."""
        attachment = self._attachments.get(attachment_id)
        if attachment is None:
            raise PermissionDenied("unknown attachment", reason="UNKNOWN_ATTACHMENT")
        if attachment.pid != peer_pid:
            raise PermissionDenied(
                f"attachment belongs to pid {attachment.pid}, asked by pid {peer_pid}",
                reason="PID_MISMATCH",
                metadata={"attached_pid": attachment.pid, "peer_pid": peer_pid},
            )
        model = self.manager._models.get(attachment.model_id)
        if model is None or model.state is not ModelState.ACTIVE:
            raise FailedPrecondition(
                f"model {attachment.model_id!r} is not active", reason="MODEL_NOT_ACTIVE"
            )
        layers = [layer for layer in model.layers if not names or layer.plan.name in names]
        unknown = set(names) - {layer.plan.name for layer in layers}
        if unknown:
            raise InvalidArgument(f"unknown layers {sorted(unknown)}", reason="UNKNOWN_LAYER")
        fds: list[int] = []
        try:
            for layer in layers:
                assert layer.slab is not None and layer.slab.tier is Tier.DEVICE
                fds.append(self.manager.backend.export(layer.slab))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        header = {
            "model_id": model.model_id,
            "layers": [{"name": layer.plan.name, "size": layer.plan.size} for layer in layers],
        }
        return header, fds


class FdServer:
    """The fd socket: a thread that accepts, checks the peer, and sends fds."""

    def __init__(
        self, registry: AgentRegistry, path: Path, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.registry = registry
        self.path = path
        self.loop = loop
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(64)
        self._thread = threading.Thread(target=self._serve, name="torpord-fds", daemon=True)

    def start(self, mode: int) -> None:
        os.chmod(self.path, mode)
        self._thread.start()

    def close(self) -> None:
        # shutdown() wakes the accept(); close() alone would not.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)
        self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                pid, _uid, _gid = struct.unpack(
                    "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                )
                request = _recv_json(conn)
                names = request.get("layers", [])
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise InvalidArgument("layers must be a list of names", reason="BAD_REQUEST")
                future = asyncio.run_coroutine_threadsafe(
                    self.registry.export(str(request.get("attachment_id", "")), pid, names),
                    self.loop,
                )
                header, fds = future.result(30)
            except TorporError as err:
                _send_json(conn, {"error": {"code": err.code.value, "reason": err.reason,
                                            "message": err.message}})  # fmt: skip
                return
            except (OSError, ValueError, TimeoutError) as err:
                log.warning("fd socket: bad request", error=str(err))
                return
            try:
                header["fd_count"] = len(fds)
                _send_json(conn, header)
                for at in range(0, len(fds), FDS_PER_MESSAGE):
                    socket.send_fds(conn, [b"F"], fds[at : at + FDS_PER_MESSAGE])
            except OSError as err:
                log.warning("fd socket: the engine went away", error=str(err))
            finally:
                for fd in fds:
                    os.close(fd)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ValueError("connection closed mid-message")
        out += chunk
    return out


def _recv_json(conn: socket.socket) -> dict[str, Any]:
    (n,) = struct.unpack("<I", _recv_exact(conn, 4))
    if n > MAX_REQUEST:
        raise ValueError(f"request of {n} bytes")
    value = json.loads(_recv_exact(conn, n))
    if not isinstance(value, dict):
        raise ValueError("request is not a JSON object")
    return value


def _send_json(conn: socket.socket, value: dict[str, Any]) -> None:
    body = json.dumps(value).encode()
    conn.sendall(struct.pack("<I", len(body)) + body)
