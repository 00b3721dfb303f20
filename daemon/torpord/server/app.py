"""The gRPC server: services, health, reflection, and its listeners."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from torpor.socketpath import check_socket_dir
from torpor.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)

from torpord.config import TcpAuth
from torpord.core.attachments.registry import AgentRegistry
from torpord.core.manager import ModelManager
from torpord.server.auth import TokenAuth, tcp_credentials
from torpord.server.boundary import RequestBounds
from torpord.server.limits import MAX_MESSAGE_BYTES
from torpord.server.services import AgentService, ModelService, NodeService

__all__ = [
    "DaemonAlreadyRunning",
    "build_server",
    "prepare_socket",
    "prepare_socket_dir",
    "set_serving",
    "socket_dir_mode",
]

# grpc-stubs does not describe grpc_health's asyncio servicer.
HealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]

SERVICE_NAMES = (
    models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name,
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
)


class DaemonAlreadyRunning(Exception):
    pass


def socket_dir_mode(socket_mode: int) -> int:
    """The mode of a socket directory torpord makes: those the socket's mode
    lets connect may enter it, nobody else may change it."""
    mode = 0o700
    if socket_mode & 0o060:
        mode |= 0o050
    if socket_mode & 0o006:
        mode |= 0o005
    return mode


def prepare_socket_dir(directory: Path, socket_mode: int) -> None:
    """Refuse an unsafe socket directory; make a missing one.

    The rules are torpor.socketpath's (shared with the client): raises its
    UnsafeSocketDir naming the directory and why. Only the missing
    components are made, each with socket_dir_mode; the mode and owner of a
    directory that already exists are never changed.
    """
    if check_socket_dir(directory, client=False):
        return
    mode = socket_dir_mode(socket_mode)
    missing: list[Path] = []
    path = directory
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            continue  # made meanwhile by someone else: the check below judges it
        os.chmod(path, mode)  # ours: exactly this mode, whatever the umask
    if not check_socket_dir(directory, client=False):
        raise FileNotFoundError(f"{directory} does not exist and could not be made")


def prepare_socket(path: Path) -> None:
    """Clear a stale socket file (its directory is prepare_socket_dir's);
    refuse to take over the socket of a daemon that still answers on it."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise DaemonAlreadyRunning(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as err:
        if err.errno in (errno.ECONNREFUSED, errno.ENOENT):
            path.unlink(missing_ok=True)
            return
        raise
    finally:
        probe.close()
    raise DaemonAlreadyRunning(f"another torpord is listening on {path}")


def build_server(
    manager: ModelManager,
    *,
    socket_path: Path,
    tcp: str | None,
    agents: AgentRegistry,
    fd_socket: Path,
    backend_reason: str = "",
    tcp_auth: TcpAuth | None = None,
) -> tuple[grpc.aio.Server, Any]:
    interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = []
    if tcp and tcp_auth is not None and tcp_auth.token is not None:
        # First, so a caller without the token learns nothing else (not even
        # whether its request was within bounds).
        interceptors.append(TokenAuth(tcp_auth.token.reveal()))
    interceptors.append(RequestBounds())
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    models_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), server)
    node_pb2_grpc.add_NodeServiceServicer_to_server(NodeService(manager, backend_reason), server)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentService(agents, fd_socket), server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    prepare_socket(socket_path)
    server.add_insecure_port(f"unix:{socket_path}")
    if tcp and _add_tcp_port(server, tcp, tcp_auth) == 0:
        raise OSError(f"could not listen on {tcp}")
    return server, health_servicer


def _add_tcp_port(server: grpc.aio.Server, tcp: str, auth: TcpAuth | None) -> int:
    credentials = None if auth is None else tcp_credentials(auth)
    if credentials is None:
        return server.add_insecure_port(tcp)
    return server.add_secure_port(tcp, credentials)


async def set_serving(health_servicer: Any, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, status)
