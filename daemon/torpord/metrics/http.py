"""A small HTTP/1.1 server for GET /metrics, on the daemon's event loop.

Not prometheus_client's start_http_server: its thread would read the core's
live objects off the event loop. Each connection gets one response and is
closed. A request's head is bounded (MAX_HEAD bytes) and must arrive within
READ_TIMEOUT seconds, the response must be taken within WRITE_TIMEOUT, and
at most MAX_CONNECTIONS are served at once, so a slow or hostile client
holds little, for a while, and never blocks the other scrapes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

__all__ = ["MAX_CONNECTIONS", "MAX_HEAD", "READ_TIMEOUT", "WRITE_TIMEOUT", "MetricsServer"]

log = structlog.get_logger("torpord.metrics")

MAX_HEAD = 8192  # the request line and headers, in bytes
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0
MAX_CONNECTIONS = 64
PATH = "/metrics"

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class MetricsServer:
    """Serves `scrape()` (the body and its content type) at GET/HEAD /metrics."""

    def __init__(
        self,
        scrape: Callable[[], tuple[bytes, str]],
        host: str,
        port: int,
        *,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self._scrape = scrape
        self._host = host
        self._port = port
        self._read_timeout = read_timeout
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def bind(self) -> None:
        """Listen (OSError if the address can't be had), not yet answering."""
        self._server = await asyncio.start_server(
            self._connected,
            self._host,
            self._port,
            limit=MAX_HEAD,
            start_serving=False,
        )

    async def start(self) -> None:
        assert self._server is not None
        await self._server.start_serving()

    @property
    def port(self) -> int:
        """The port listened on (the one asked for, or the one given for 0)."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=1.0)
        await self._server.wait_closed()
        self._server = None

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        answered = False
        status: int | None
        try:
            if len(self._handlers) > MAX_CONNECTIONS:
                status, headers, body = _error(503, "too many connections; try again")
            else:
                status, headers, body = await self._answer(reader)
            if status is not None:
                # (drain returns once all of it is with the kernel, not before)
                writer.transport.set_write_buffer_limits(high=0)
                writer.write(_response(status, headers, body))
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
            answered = True
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass  # (the client went away or would not take it; or the daemon stops)
        finally:
            self._handlers.discard(task)
            if answered:
                writer.close()
            else:
                writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int | None, list[str], bytes]:
        """The status, headers and body for the request `reader` brings
        (no status: nothing to answer, the client sent nothing)."""
        try:
            async with asyncio.timeout(self._read_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            return _error(408, "the request did not arrive in time")
        except asyncio.IncompleteReadError as err:
            if not err.partial:
                return None, [], b""
            return _error(400, "the request ended before its headers did")
        except asyncio.LimitOverrunError:
            return _error(431, f"the request line and headers exceed {MAX_HEAD} bytes")
        try:
            lines = head[:-4].decode("ascii").split("\r\n")
        except UnicodeDecodeError:
            return _error(400, "the request is not ASCII")
        parts = lines[0].split(" ")
        if (
            len(parts) != 3
            or parts[2] not in ("HTTP/1.0", "HTTP/1.1")
            or not parts[0].isalpha()
            or not parts[1].startswith("/")
            or any(":" not in line or "\n" in line or "\r" in line for line in lines[1:])
        ):
            return _error(400, "malformed request")
        method, target = parts[0], parts[1]
        if target.split("?", 1)[0] != PATH:
            return _error(404, f"not found; the metrics are at {PATH}")
        if method not in ("GET", "HEAD"):
            status, headers, body = _error(405, "only GET and HEAD")
            return status, [*headers, "Allow: GET, HEAD"], body
        try:
            body, content_type = self._scrape()
        except Exception:
            log.exception("collecting the metrics failed")
            return _error(500, "collecting the metrics failed; see the daemon's log")
        headers = [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        return 200, headers, (b"" if method == "HEAD" else body)


def _error(status: int, text: str) -> tuple[int, list[str], bytes]:
    body = f"{status} {_REASONS[status]}: {text}\n".encode()
    return status, ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}"], body


def _response(status: int, headers: list[str], body: bytes) -> bytes:
    head = [f"HTTP/1.1 {status} {_REASONS[status]}", *headers, "Connection: close", "", ""]
    return "\r\n".join(head).encode() + body
