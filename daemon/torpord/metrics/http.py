"""A small HTTP/1.1 server for GET /metrics, on the daemon's event loop.

Not prometheus_client's start_http_server: its thread would read the core's
live objects off the event loop. Each connection gets one response and is
closed. A request's head is bounded (MAX_HEAD bytes) and must arrive within
READ_TIMEOUT seconds, the response must be taken within WRITE_TIMEOUT (and
the client has LINGER more to close: see _linger), and at most
MAX_CONNECTIONS are open at once, so a slow or hostile client holds
little, for a while.

Nor can such clients keep the scrapes out by holding every connection: at
the limit, a new connection takes the place of the one that has been
waiting longest without a complete request head (then of one that has its
whole answer and has not closed yet, then of the one slowest to take its
answer), which is dropped. A client that sends its request at once and
reads the answer is served however many others hold connections; only when
every connection is being answered (collecting the figures) is a new one
refused with 503.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

__all__ = ["MAX_CONNECTIONS", "MAX_HEAD", "READ_TIMEOUT", "WRITE_TIMEOUT", "MetricsServer"]

log = structlog.get_logger("torpord.metrics")

MAX_HEAD = 8192  # the request line and headers, in bytes
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0
LINGER = 2.0  # seconds a client has to close once it has the whole answer
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


# What a connection is doing, and in which order those that may be dropped
# for a new one are (the lowest first; then the one in it longest).
_HEAD, _LINGER, _WRITE, _COLLECT = 0, 1, 2, 3
_DROPPABLE = (_HEAD, _LINGER, _WRITE)


@dataclass(eq=False)
class _Connection:
    task: asyncio.Task[None]
    writer: asyncio.StreamWriter
    doing: int
    since: float  # (the loop's clock) when it began doing that

    def now_doing(self, doing: int) -> None:
        self.doing, self.since = doing, asyncio.get_running_loop().time()


class MetricsServer:
    """Serves `scrape()` (the body and its content type) at GET/HEAD /metrics;
    `on_close` is called once it is closed (the collector stops listening)."""

    def __init__(
        self,
        scrape: Callable[[], Awaitable[tuple[bytes, str]]],
        host: str,
        port: int,
        *,
        read_timeout: float = READ_TIMEOUT,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._scrape = scrape
        self._on_close = on_close
        self._host = host
        self._port = port
        self._read_timeout = read_timeout
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}

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
        on_close, self._on_close = self._on_close, None
        try:
            if self._server is None:
                return
            self._server.close()
            handlers = set(self._connections)
            for task in handlers:
                task.cancel()
            if handlers:
                await asyncio.wait(handlers, timeout=1.0)
            await self._server.wait_closed()
            self._server = None
        finally:
            if on_close is not None:
                on_close()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(task, writer, _HEAD, asyncio.get_running_loop().time())
        answered = False
        status: int | None
        try:
            if len(self._connections) >= MAX_CONNECTIONS and not self._drop_one():
                status, headers, body = _error(503, "too many connections; try again")
            else:
                self._connections[task] = connection
                status, headers, body = await self._answer(reader, connection)
            if status is not None:
                # (drain returns once all of it is with the kernel, not before)
                writer.transport.set_write_buffer_limits(high=0)
                writer.write(_response(status, headers, body))
                connection.now_doing(_WRITE)
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
                if status != 503:  # (those over the limit hold nothing longer)
                    connection.now_doing(_LINGER)
                    await _linger(reader, writer)
            answered = True
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass  # (the client went away or would not take it; dropped; or the daemon stops)
        finally:
            self._connections.pop(task, None)
            if answered:
                writer.close()
            else:
                writer.transport.abort()

    def _drop_one(self) -> bool:
        """Make room for a new connection: drop the one that has been waiting
        longest for its request head (then one lingering, then one writing).
        False if every one is being answered."""
        droppable = [c for c in self._connections.values() if c.doing in _DROPPABLE]
        if not droppable:
            return False
        victim = min(droppable, key=lambda c: (c.doing, c.since))
        del self._connections[victim.task]  # (its fd is closed now, its task ends soon)
        victim.writer.transport.abort()
        victim.task.cancel()
        return True

    async def _answer(
        self, reader: asyncio.StreamReader, connection: _Connection
    ) -> tuple[int | None, list[str], bytes]:
        """The status, headers and body for the request `reader` brings
        (no status: nothing to answer, the client sent nothing)."""
        try:
            async with asyncio.timeout(self._read_timeout):
                head = await _read_head(reader)
            if not head:
                return None, [], b""
        except TimeoutError:
            return _error(408, "the request did not arrive in time")
        except asyncio.IncompleteReadError:
            return _error(400, "the request ended before its headers did")
        except asyncio.LimitOverrunError:
            return _error(431, f"the request line and headers exceed {MAX_HEAD} bytes")
        connection.now_doing(_COLLECT)  # (not dropped for another while it is answered)
        try:
            lines = [line.decode("ascii") for line in head]
        except UnicodeDecodeError:
            return _error(400, "the request is not ASCII")
        parts = lines[0].split(" ")
        if (
            len(parts) != 3
            or parts[2] not in ("HTTP/1.0", "HTTP/1.1")
            or not parts[0].isalpha()
            or (path := _path(parts[1])) is None
            or any(":" not in line or "\n" in line or "\r" in line for line in lines[1:])
        ):
            return _error(400, "malformed request")
        method = parts[0]
        if path != PATH:
            return _error(404, f"not found; the metrics are at {PATH}")
        if method not in ("GET", "HEAD"):
            status, headers, body = _error(405, "only GET and HEAD")
            return status, [*headers, "Allow: GET, HEAD"], body
        try:
            body, content_type = await self._scrape()
        except Exception:
            log.exception("collecting the metrics failed")
            return _error(500, "collecting the metrics failed; see the daemon's log")
        headers = [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        return 200, headers, (b"" if method == "HEAD" else body)


async def _read_head(reader: asyncio.StreamReader) -> list[bytes]:
    """The request line and header lines, without their ends: CRLF, or a
    bare LF (RFC 9112 2.2 lets a recipient take one as a line's end; curl
    sends CRLF, `printf ... | nc` often LF). Empty lines before the request
    line are skipped (2.2 again). None at all if the stream ends before a
    byte came; IncompleteReadError if it ends later, before the head does;
    LimitOverrunError past MAX_HEAD bytes."""
    lines: list[bytes] = []
    size = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as err:
            if size or err.partial:
                raise
            return []
        size += len(line)
        if size > MAX_HEAD:
            raise asyncio.LimitOverrunError("the request head is too long", size)
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if line:
            lines.append(line)
        elif lines:
            return lines


# absolute-form (RFC 9112 3.2.2; what a client sends through a proxy): its
# authority, then its path and query, if any
_ABSOLUTE = re.compile(r"(?i:https?)://[A-Za-z0-9._~%!$&'()*+,;=:@\[\]-]+([/?][^#]*)?")


def _path(target: str) -> str | None:
    """The path of an origin-form or absolute-form request target (None: neither)."""
    if target.startswith("/"):
        return target.split("?", 1)[0]
    match = _ABSOLUTE.fullmatch(target)
    if match is None:
        return None
    return (match.group(1) or "").split("?", 1)[0] or "/"


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """End the answer (FIN) and let the client close first, discarding what
    it still sends, for LINGER seconds at most. Closing with bytes of the
    client's unread (a body, a pipelined request) would reset the connection,
    and a reset may drop the end of the answer the client has not read yet."""
    writer.write_eof()
    try:
        async with asyncio.timeout(LINGER):
            while await reader.read(65536):
                pass
    except (OSError, TimeoutError):
        pass


def _error(status: int, text: str) -> tuple[int, list[str], bytes]:
    body = f"{status} {_REASONS[status]}: {text}\n".encode()
    return status, ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}"], body


def _response(status: int, headers: list[str], body: bytes) -> bytes:
    head = [f"HTTP/1.1 {status} {_REASONS[status]}", *headers, "Connection: close", "", ""]
    return "\r\n".join(head).encode() + body
