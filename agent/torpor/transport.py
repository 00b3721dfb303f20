"""How a client reaches torpord over its Unix socket: in a safe directory only.

Over the Unix socket the kernel checks who connects; the client checks that
the socket's directory is one nobody but the daemon's user (or root) could
have put another socket in (torpor.socketpath's rules).
"""

from __future__ import annotations

import os

import grpc

from torpor.errors import DAEMON_UNAVAILABLE, TorporError
from torpor.socketpath import UnsafeSocketDir, check_socket_dir

__all__ = ["UNSAFE_SOCKET_DIR", "SocketGuard"]

UNSAFE_SOCKET_DIR = "UNSAFE_SOCKET_DIR"
"""The reason given when the client refuses the socket's directory."""


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
