"""The client side of Torpor's error contract.

torpord aborts a failed RPC with a `google.rpc.Status` whose details hold a
`google.rpc.ErrorInfo` (domain "torpor.dev", an UPPER_SNAKE reason and string
metadata). `from_rpc_error` turns such a failure back into one exception type,
`TorporError`, so callers never need to look at gRPC's error objects.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = ["DAEMON_UNAVAILABLE", "DOMAIN", "TorporError", "from_rpc_error"]

DOMAIN = "torpor.dev"
"""The ErrorInfo domain torpord uses."""

DAEMON_UNAVAILABLE = "DAEMON_UNAVAILABLE"
"""The reason given when the daemon could not be reached at all."""


class TorporError(Exception):
    """A failed call to torpord: a status code, an UPPER_SNAKE reason and metadata.

    `reason` is the daemon's ErrorInfo reason (for example `NOT_FOUND`,
    `TRANSITION_IN_PROGRESS`, `SOURCE_CHANGED`). Where the failure carried no
    ErrorInfo it is the status code's name, except that a connection failure
    is `DAEMON_UNAVAILABLE`.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
        *,
        domain: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.domain = domain

    @property
    def code_name(self) -> str:
        """The status code's name, e.g. `NOT_FOUND`."""
        return self.code.name

    @property
    def unavailable(self) -> bool:
        """True when the daemon could not be reached (nothing ran)."""
        return self.reason == DAEMON_UNAVAILABLE

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"TorporError({self.code.name}, {self.reason}, {self.message!r}, "
            f"metadata={self.metadata!r})"
        )


def _error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo in the status details, preferring torpord's domain."""
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except (AttributeError, TypeError, ValueError):
        # Not a Call, or a status whose code/message disagree with the call's.
        return None
    if status is None:
        return None
    found: error_details_pb2.ErrorInfo | None = None
    for detail in status.details:
        if not detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            continue
        info = error_details_pb2.ErrorInfo()
        detail.Unpack(info)
        if info.domain == DOMAIN:
            return info
        found = found or info
    return found


def _code(err: grpc.RpcError) -> grpc.StatusCode:
    try:
        code = err.code()
    except AttributeError:
        return grpc.StatusCode.UNKNOWN
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _details(err: grpc.RpcError) -> str:
    try:
        details = err.details()
    except AttributeError:
        return str(err)
    return details or ""


def _describe_target(target: str) -> str:
    if target.startswith("unix://"):
        return f"socket {target[len('unix://') :]}"
    if target.startswith("unix:"):
        return f"socket {target[len('unix:') :]}"
    return f"address {target}"


def _connect_error(details: str) -> str:
    """The OS error at the end of gRPC's connect failure, else the whole text.

    gRPC says "failed to connect to all addresses; last error: UNKNOWN:
    unix:/x.sock: connect failed: ... error: No such file or directory"; the
    last part is what a person needs (the full text stays on `__cause__`).
    """
    if "failed to connect" in details and " error: " in details:
        tail = details.rsplit(" error: ", 1)[1].strip()
        if tail:
            return tail
    return details


def from_rpc_error(err: grpc.RpcError, *, target: str | None = None) -> TorporError:
    """Translate a gRPC failure into a `TorporError`.

    `target` is the channel target the call was made on (`unix:/path` or
    `host:port`); it names what could not be reached when the daemon is
    unavailable. `Client` passes it; other callers may leave it out.
    """
    code = _code(err)
    details = _details(err)
    info = _error_info(err)
    if info is not None:
        return TorporError(
            code,
            info.reason or code.name,
            details,
            dict(info.metadata),
            domain=info.domain,
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        # No ErrorInfo: gRPC itself gave up (no socket, refused, permission
        # denied, daemon gone mid-call), not a decision of the daemon's.
        where = f" on {_describe_target(target)}" if target else ""
        message = f"cannot reach torpord{where}"
        if details:
            message += f": {_connect_error(details)}"
        metadata = {"target": target} if target else {}
        return TorporError(code, DAEMON_UNAVAILABLE, message, metadata)
    return TorporError(code, code.name, details or code.name.replace("_", " ").lower())
