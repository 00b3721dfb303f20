"""Who may call over TCP: TLS credentials and the bearer-token check.

The Unix socket is the local trust boundary (the kernel admits its owner and
group), so nothing is asked of calls that come through it. Over TCP:

- mutual TLS is the TLS handshake's: grpc requires and verifies a client
  certificate signed by server.tls_client_ca before any call exists;
- a bearer token is checked here, per call, before the servicer runs: a call
  without `authorization: Bearer <token>` metadata matching server.token_file
  (compared in constant time) ends UNAUTHENTICATED with an ErrorInfo and
  changes nothing. Two services stay open: the standard health check (it
  says only whether the daemon serves; probes need no token) and server
  reflection (the API's schema, which is public: grpcurl reads it before
  every call, so a caller without a token gets the method's own
  UNAUTHENTICATED answer rather than a failed schema lookup).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from torpord.config import TcpAuth
from torpord.errors import Unauthenticated
from torpord.server.errors import abort
from torpord.server.ratelog import LogBudget

__all__ = ["OPEN_METHODS", "TokenAuth", "tcp_credentials"]

log = structlog.get_logger("torpord.server.auth")

OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)

Context = grpc.aio.ServicerContext[Any, Any]


def tcp_credentials(auth: TcpAuth) -> grpc.ServerCredentials | None:
    """The TLS credentials of the TCP port, None for plaintext."""
    if auth.tls_cert_chain is None or auth.tls_private_key is None:
        return None
    return grpc.ssl_server_credentials(
        [(auth.tls_private_key.reveal(), auth.tls_cert_chain)],
        root_certificates=auth.tls_client_ca,
        require_client_auth=auth.tls_client_ca is not None,
    )


if TYPE_CHECKING:  # grpc's classes are generic only in grpc-stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    Interceptor = grpc.aio.ServerInterceptor


class TokenAuth(Interceptor):
    """Refuse TCP calls without the bearer token (see the module's doc)."""

    def __init__(self, token: bytes) -> None:
        self._token = token
        # A caller looping on a wrong token must not flood the journal.
        self._budget = LogBudget()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS:
            return handler
        return _guarded(handler, lambda context: self._refusal(details, context))

    def _refusal(
        self, details: grpc.HandlerCallDetails, context: Context
    ) -> Unauthenticated | None:
        """Why this call may not run, or None. Unix-socket calls always may."""
        peer = context.peer()
        if peer.startswith("unix:"):
            return None
        metadata = details.invocation_metadata or ()
        given = [value for key, value in metadata if key == "authorization"]
        meta = {"method": details.method}
        if not given:
            error = Unauthenticated(
                "calls over TCP need credentials: send the metadata 'authorization: Bearer"
                " <token>' with the token of torpord's server.token_file",
                reason="TOKEN_MISSING",
                metadata=meta,
            )
        elif not self._matches(given):
            # Nothing of what was sent is quoted back (it may be someone's secret).
            error = Unauthenticated(
                "the bearer token in the 'authorization' metadata is not torpord's token",
                reason="TOKEN_INVALID",
                metadata=meta,
            )
        else:
            return None
        self._log(peer, details.method, error.reason)
        return error

    def _matches(self, given: list[str | bytes]) -> bool:
        if len(given) != 1:
            return False
        value = given[0] if isinstance(given[0], bytes) else given[0].encode("utf-8", "replace")
        scheme, _, token = value.partition(b" ")
        # RFC 7235: the scheme is case-insensitive.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token)

    def _log(self, peer: str, method: str, reason: str) -> None:
        skipped = self._budget.take()
        if skipped is not None:
            log.warning(
                "refused a call over TCP",
                peer=peer,
                method=method,
                reason=reason,
                skipped_since_last=skipped,
            )


Check = Callable[[Context], Unauthenticated | None]


def _guarded(handler: Handler, check: Check) -> Handler:
    """`handler` whose behaviour runs only once `check` finds nothing wrong."""
    codecs: Any = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    # (Any: grpc-stubs types the behaviours as synchronous; on grpc.aio they are async.)
    if handler.unary_unary is not None:
        unary: Any = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            if (error := check(context)) is not None:
                await abort(context, error)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **codecs)
    if handler.stream_unary is not None:
        stream_in: Any = handler.stream_unary

        async def stream_unary(requests: Any, context: Context) -> Any:
            if (error := check(context)) is not None:
                await abort(context, error)
            return await stream_in(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **codecs)
    if handler.unary_stream is not None:
        stream_out: Any = handler.unary_stream

        async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            if (error := check(context)) is not None:
                await abort(context, error)
            async for item in _responses(stream_out(request, context)):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **codecs)
    both: Any = handler.stream_stream

    async def stream_stream(requests: Any, context: Context) -> AsyncIterator[Any]:
        if (error := check(context)) is not None:
            await abort(context, error)
        async for item in _responses(both(requests, context)):
            yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, **codecs)


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A streaming behaviour's responses: it is an async generator, or a
    coroutine that writes them itself with context.write()."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result
