"""How a client reaches torpord: a Unix socket in a safe directory, or TCP with credentials.

Over the Unix socket the kernel checks who connects; the client checks that
the socket's directory is one nobody but the daemon's user (or root) could
have put another socket in (torpor.socketpath's rules). Over TCP the daemon
asks for credentials: a bearer token (sent as `authorization: Bearer ...`
call credentials), a client certificate (mutual TLS), or both.
"""

from __future__ import annotations

import os

import grpc

from torpor.credfiles import is_loopback_address, parse_token, read_pem_file, read_token_file
from torpor.errors import DAEMON_UNAVAILABLE, TorporError
from torpor.socketpath import UnsafeSocketDir, check_socket_dir

__all__ = ["UNSAFE_SOCKET_DIR", "SocketGuard", "tcp_channel"]

UNSAFE_SOCKET_DIR = "UNSAFE_SOCKET_DIR"
"""The reason given when the client refuses the socket's directory."""

PathArg = str | os.PathLike[str]


class SocketGuard:
    """Checks a socket's directory before calls, until it has found it there and safe.

    A directory that is the user's (or root's) and writable by nobody else
    stays so; a missing one could still be made by anyone, so calls fail
    as unavailable (nothing is sent) until it exists. Construction checks at
    once, accepting a missing directory (the daemon may start later).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.directory = os.path.dirname(os.path.abspath(path))
        self._safe = False
        self.check(missing_ok=True)

    def check(self, *, missing_ok: bool = False) -> None:
        """Raise TorporError (UNSAFE_SOCKET_DIR, or DAEMON_UNAVAILABLE when the
        directory is missing and not `missing_ok`) unless it is safe."""
        if self._safe:
            return
        try:
            self._safe = check_socket_dir(self.directory, client=True)
        except UnsafeSocketDir as err:
            raise TorporError(
                grpc.StatusCode.FAILED_PRECONDITION,
                UNSAFE_SOCKET_DIR,
                f"refusing torpord's socket {self.path}: {err.directory} {err.why}; whoever"
                " can change it can put their own socket in torpord's place",
                {"socket": self.path, "directory": err.directory},
            ) from None
        if not self._safe and not missing_ok:
            raise TorporError(
                grpc.StatusCode.UNAVAILABLE,
                DAEMON_UNAVAILABLE,
                f"cannot reach torpord on socket {self.path}: its directory does not exist",
                {"target": "unix:" + self.path},
            )


def tcp_channel(
    address: str,
    options: list[tuple[str, int]],
    *,
    token: str | None = None,
    token_file: PathArg | None = None,
    ca_cert: PathArg | None = None,
    client_cert: PathArg | None = None,
    client_key: PathArg | None = None,
) -> grpc.Channel:
    """A channel to `address` with the credentials given; ValueError for a bad
    combination or file (the message names it, never a secret)."""
    if token is not None and token_file is not None:
        raise ValueError("give a token or a token file, not both")
    if (client_cert is None) != (client_key is None):
        raise ValueError("a client certificate and its key go together: give both or neither")
    if client_cert is not None and ca_cert is None:
        raise ValueError(
            "a client certificate needs the CA certificate that signed torpord's (TLS first)"
        )
    secret: bytes | None = None
    if token is not None:
        secret = parse_token(token.encode("utf-8", "replace"))
        if secret is None:
            raise ValueError("the token is not a bearer token (RFC 6750 characters, 16 or more)")
    elif token_file is not None:
        secret = read_token_file(token_file)
    if secret is not None and ca_cert is None and not is_loopback_address(address):
        raise ValueError(
            f"refusing to send the token to {address} without TLS: it is not a loopback"
            " address (give the CA certificate of torpord's TLS certificate)"
        )
    credentials: grpc.ChannelCredentials | None = None
    if ca_cert is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read_pem_file(ca_cert),
            private_key=None if client_key is None else read_pem_file(client_key, private_key=True),
            certificate_chain=None if client_cert is None else read_pem_file(client_cert),
        )
    elif secret is not None:
        # gRPC sends call credentials only over a secure channel; "local" is
        # its name for plaintext on loopback, which it checks on connecting.
        credentials = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    if secret is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(secret.decode("ascii"))
        )
    return grpc.secure_channel(address, credentials, options=options)
