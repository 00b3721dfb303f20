"""Domain errors.

Every error a user can cause is a `TorporError` carrying a status code, an
UPPER_SNAKE reason and string metadata. Nothing here knows about gRPC: the
server turns these into statuses with a google.rpc.ErrorInfo in one place
(torpord.server.errors), and the client library turns them back.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Code",
    "DataLoss",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "TorporError",
    "Unavailable",
    "clip",
    "some",
]


class Code(enum.Enum):
    """The status codes domain errors use (a subset of gRPC's, by name)."""

    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"


class TorporError(Exception):
    """An error with a status code, a machine-readable reason and metadata."""

    code: Code = Code.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value}, {self.reason}, {self.message!r})"


class InvalidArgument(TorporError):
    code = Code.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(TorporError):
    code = Code.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(TorporError):
    code = Code.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(TorporError):
    code = Code.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(TorporError):
    code = Code.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class FailedPrecondition(TorporError):
    code = Code.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(TorporError):
    code = Code.ABORTED
    default_reason = "ABORTED"


class Unavailable(TorporError):
    code = Code.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DataLoss(TorporError):
    code = Code.DATA_LOSS
    default_reason = "DATA_LOSS"


class Unimplemented(TorporError):
    code = Code.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


__all__ += ["Unimplemented"]


class Unauthenticated(TorporError):
    code = Code.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


__all__ += ["Unauthenticated"]


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8 (ending in "…" when cut).

    For what a caller gave (an id, a path) that an error echoes: the status
    must stay small whatever came in. Lone surrogates, which UTF-8 cannot
    carry, come out escaped."""
    raw = text.encode("utf-8", "backslashreplace")
    if len(raw) <= limit:
        return raw.decode()
    if limit < 3:
        return ""
    return raw[: limit - 3].decode("utf-8", "ignore") + "…"


def some(items: Iterable[str], *, shown: int = 5, each: int = 64) -> str:
    """The first `shown` of `items`, quoted and clipped to `each` bytes, and
    how many more: "'a', 'b' and 99,990 more". For errors that list what a
    caller gave, which may be a hundred thousand names."""
    names = list(items)
    head = ", ".join(repr(clip(name, each)) for name in names[:shown])
    rest = len(names) - shown
    return f"{head} and {rest:,} more" if rest > 0 else head
