"""The one place domain errors become gRPC statuses (with google.rpc.ErrorInfo).

A status travels in trailers, and clients refuse trailers over their
metadata limit (8 KiB by default) with a bare RESOURCE_EXHAUSTED that has
lost the reason. Errors may echo what a caller gave, so every status is cut
to fit here, whatever the error says: the message to MAX_MESSAGE bytes,
each metadata value to MAX_VALUE and all of the metadata to MAX_METADATA.
The message travels twice (grpc-message, percent-encoded: up to 3 bytes a
byte; and inside grpc-status-details-bin, base64: 4 for 3), so the worst
case is about 3 KiB + 4/3 x (1 + 1 KiB), under 6 KiB.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar, cast

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from torpord.errors import TorporError, clip

__all__ = [
    "DOMAIN",
    "MAX_MESSAGE",
    "MAX_METADATA",
    "MAX_VALUE",
    "abort",
    "status_for",
    "translate_errors",
    "translate_stream_errors",
]

DOMAIN = "torpor.dev"
MAX_MESSAGE = 1024  # bytes of UTF-8
MAX_VALUE = 256  # bytes, each metadata value
MAX_METADATA = 1024  # bytes, every key and value together
log = structlog.get_logger("torpord.server")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
G = TypeVar("G", bound=Callable[..., AsyncIterator[Any]])
Context = grpc.aio.ServicerContext[Any, Any]


def _bounded_metadata(metadata: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    left = MAX_METADATA
    for key, value in metadata.items():
        key = clip(key, MAX_VALUE)
        left -= len(key.encode())
        if left <= 0:
            break
        out[key] = clip(value, min(MAX_VALUE, left))
        left -= len(out[key].encode())
    return out


def status_for(err: TorporError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(
        reason=err.reason, domain=DOMAIN, metadata=_bounded_metadata(err.metadata)
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    code = getattr(code_pb2, err.code.value)
    message = clip(err.message, MAX_MESSAGE)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[detail]))


def _internal(method: str, exc: Exception) -> TorporError:
    log.exception("unexpected error in RPC", method=method)
    return TorporError(f"internal error in {method}: {type(exc).__name__}", reason="INTERNAL")


async def abort(context: Context, err: TorporError) -> NoReturn:
    # What aio's abort_with_status does, through the typed abort().
    status = status_for(err)
    await context.abort(status.code, status.details, status.trailing_metadata)


def translate_errors(fn: F) -> F:
    """Wrap a unary servicer method: TorporError → its status; any other
    exception is a bug, logged with its traceback and answered INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self: object, request: object, context: Context) -> object:
        try:
            return await fn(self, request, context)
        except TorporError as err:
            await abort(context, err)
        except Exception as exc:
            await abort(context, _internal(fn.__name__, exc))

    return cast(F, wrapper)


def translate_stream_errors(fn: G) -> G:
    """The same for server-streaming methods."""

    @functools.wraps(fn)
    async def wrapper(self: object, request: object, context: Context) -> AsyncIterator[object]:
        try:
            async for item in fn(self, request, context):
                yield item
        except TorporError as err:
            await abort(context, err)
        except Exception as exc:
            await abort(context, _internal(fn.__name__, exc))

    return cast(G, wrapper)
