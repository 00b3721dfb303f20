"""torpor: the client library, CLI and engine agent for the Torpor daemon."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torpor.client import Client, ModelWatch, default_socket_path
    from torpor.errors import TorporError

__all__ = ["Client", "ModelWatch", "TorporError", "default_socket_path"]


def __getattr__(name: str) -> Any:
    """The client's names, loaded on first use: the daemon's lower layers
    import torpor's gRPC-free modules (boundedjson, fdwire, layout,
    cudadriver), and importing the package must not pull gRPC in with them."""
    if name in ("Client", "ModelWatch", "default_socket_path"):
        from torpor import client

        return getattr(client, name)
    if name == "TorporError":
        from torpor import errors

        return errors.TorporError
    raise AttributeError(f"module 'torpor' has no attribute {name!r}")
