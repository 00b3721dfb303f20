"""torpor: the client library, CLI and engine agent for the Torpor daemon."""

from torpor.client import Client, ModelWatch, default_socket_path
from torpor.errors import TorporError

__all__ = ["Client", "ModelWatch", "TorporError", "default_socket_path"]
