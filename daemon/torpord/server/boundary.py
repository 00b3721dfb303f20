"""Every request, checked as it comes in: it decodes, and it is within bounds.

Left to itself, grpcio answers bytes that do not decode as the request
message with UNKNOWN (INTERNAL on the Attach stream) and logs a traceback at
error level for each. This interceptor wraps each method's deserializer: a
message that does not decode, or one over the bounds of
`torpord.server.limits`, becomes a `_Refused` in its place, which the
wrapped method answers INVALID_ARGUMENT (MALFORMED_REQUEST, FIELD_TOO_LONG,
TOO_MANY_ITEMS) before the servicer sees anything. Refusals are logged at a
bounded rate, without the request.

It covers unary and streaming requests alike (on a stream, each message as
it is read). Methods must be asynchronous (every handler of this server is);
a stream read with context.read() rather than its iterator is not checked.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from google.protobuf.message import Message

from torpord.errors import InvalidArgument, TorporError
from torpord.server.errors import abort
from torpord.server.limits import check_request
from torpord.server.ratelog import LogBudget

__all__ = ["RequestBounds"]

log = structlog.get_logger("torpord.server")

Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:  # (generic only in grpc-stubs)
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Interceptor = grpc.aio.ServerInterceptor
Behaviour = Callable[..., Any]


class _Refused:
    """Stands in for a request that was refused as it was decoded."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


class RequestBounds(Interceptor):
    def __init__(self) -> None:
        self._budget = LogBudget()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: Any = await continuation(handler_call_details)
        # (None: no such method, which grpc answers UNIMPLEMENTED itself.)
        if handler is None or handler.request_deserializer is None:
            return handler  # type: ignore[no-any-return]
        method = handler_call_details.method  # (a registered method's name, not the caller's)
        deserialize = self._deserializer(handler.request_deserializer, method)
        if handler.request_streaming and handler.response_streaming:
            kind, behaviour = "stream_stream", _stream_in(handler.stream_stream)
        elif handler.request_streaming:
            kind, behaviour = "stream_unary", _stream_in(handler.stream_unary)
        elif handler.response_streaming:
            kind, behaviour = "unary_stream", _unary_in(handler.unary_stream)
        else:
            kind, behaviour = "unary_unary", _unary_in(handler.unary_unary)
        if behaviour is None:  # synchronous: left as grpc serves it
            return handler  # type: ignore[no-any-return]
        return handler._replace(request_deserializer=deserialize, **{kind: behaviour})  # type: ignore[no-any-return]

    def _deserializer(
        self, inner: Callable[[bytes], Any], method: str
    ) -> Callable[[bytes], object]:
        def deserialize(raw: bytes) -> object:
            try:
                message = inner(raw)
            except Exception:  # protobuf's DecodeError, or anything a broken input raises
                error = InvalidArgument(
                    f"the request to {method} is not a valid message of its type"
                    f" ({len(raw):,} bytes that do not decode)",
                    reason="MALFORMED_REQUEST",
                    metadata={"method": method},
                )
            else:
                try:
                    if isinstance(message, Message):
                        check_request(message)
                    return message
                except InvalidArgument as err:
                    # Without its traceback, whose frames hold the request: a
                    # cycle (through this frame) only the collector would free.
                    error = err.with_traceback(None)
            skipped = self._budget.take()
            if skipped is not None:
                log.warning(
                    "request refused",
                    method=method,
                    reason=error.reason,
                    field=error.metadata.get("field", ""),
                    skipped_since_last=skipped,
                )
            return _Refused(error)

        return deserialize


def _unary_in(behaviour: Behaviour) -> Behaviour | None:
    if inspect.isasyncgenfunction(behaviour):

        async def streamed(request: object, context: Context) -> AsyncIterator[object]:
            if isinstance(request, _Refused):
                await abort(context, request.error)
            async for item in behaviour(request, context):
                yield item

        return streamed
    if inspect.iscoroutinefunction(behaviour):

        async def unary(request: object, context: Context) -> object:
            if isinstance(request, _Refused):
                await abort(context, request.error)
            return await behaviour(request, context)

        return unary
    return None


async def _checked(requests: AsyncIterator[object]) -> AsyncIterator[object]:
    async for request in requests:
        if isinstance(request, _Refused):
            raise request.error  # (our servicers turn it into its status)
        yield request


def _stream_in(behaviour: Behaviour) -> Behaviour | None:
    if inspect.isasyncgenfunction(behaviour):

        async def streamed(
            requests: AsyncIterator[object], context: Context
        ) -> AsyncIterator[object]:
            try:
                async for item in behaviour(_checked(requests), context):
                    yield item
            except TorporError as err:  # a servicer that does not translate errors
                await abort(context, err)

        return streamed
    if inspect.iscoroutinefunction(behaviour):

        async def unary(requests: AsyncIterator[object], context: Context) -> object:
            try:
                return await behaviour(_checked(requests), context)
            except TorporError as err:
                await abort(context, err)

        return unary
    return None
