"""The one place domain errors become gRPC statuses (with google.rpc.ErrorInfo)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar, cast

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from torpord.errors import TorporError

__all__ = ["DOMAIN", "status_for", "translate_errors", "translate_stream_errors"]

DOMAIN = "torpor.dev"
log = structlog.get_logger("torpord.server")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
G = TypeVar("G", bound=Callable[..., AsyncIterator[Any]])
Context = grpc.aio.ServicerContext[Any, Any]


def status_for(err: TorporError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    code = getattr(code_pb2, err.code.value)
    return rpc_status.to_status(status_pb2.Status(code=code, message=err.message, details=[detail]))


def _internal(method: str, exc: Exception) -> TorporError:
    log.exception("unexpected error in RPC", method=method)
    return TorporError(f"internal error in {method}: {type(exc).__name__}", reason="INTERNAL")


async def _abort(context: Context, err: TorporError) -> NoReturn:
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
            await _abort(context, err)
        except Exception as exc:
            await _abort(context, _internal(fn.__name__, exc))

    return cast(F, wrapper)


def translate_stream_errors(fn: G) -> G:
    """The same for server-streaming methods."""

    @functools.wraps(fn)
    async def wrapper(self: object, request: object, context: Context) -> AsyncIterator[object]:
        try:
            async for item in fn(self, request, context):
                yield item
        except TorporError as err:
            await _abort(context, err)
        except Exception as exc:
            await _abort(context, _internal(fn.__name__, exc))

    return cast(G, wrapper)
