"""The fd socket: where an attached engine takes its slabs' file descriptors.

One request per connection, in the format of torpor.fdwire (checked by
torpord.server.fdwire; see torpord.core.attachments for who may ask what);
a request that does not parse
or is over its bounds is answered with an error, never a dead thread.

Anyone in the socket's group can connect, so no connection costs more than
a bounded share. One thread reads every connection, never blocking on one;
a request must arrive within `request_timeout` of connecting; at most
MAX_WAITING connections wait for theirs, and a new one pushes out the
oldest (so a crowd of idle connections cannot lock an engine out; it is
told FD_SOCKET_BUSY). A fixed pool of WORKERS threads answers complete
requests, at most MAX_QUEUED waiting for one (more are answered busy at
once). Refusals are logged at a bounded rate.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import queue
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from torpor.fdwire import PREFIX_BYTES, frame_length

from torpord.errors import InvalidArgument, TorporError, Unavailable
from torpord.server.fdwire import MAX_REQUEST, FdRequest, parse_request, send_error, send_json
from torpord.server.limits import too_long
from torpord.server.ratelog import LogBudget

if TYPE_CHECKING:
    from torpord.core.attachments.registry import AgentRegistry

__all__ = ["FdServer"]

log = structlog.get_logger("torpord.agents")
T = TypeVar("T")

# The kernel passes at most 253 fds in one message.
FDS_PER_MESSAGE = 250
# How long an fd request waits for the event loop before it is refused.
EXPORT_TIMEOUT = 30.0
# How long a connection may take to send its request.
REQUEST_TIMEOUT = 5.0
# How long an answer may take to leave (the engine reads it at once).
SEND_TIMEOUT = 5.0
WORKERS = 4
MAX_WAITING = 64
MAX_QUEUED = 64


@dataclass(eq=False)
class _Waiting:
    """A connection whose request has not all arrived."""

    conn: socket.socket
    pid: int
    deadline: float
    buffer: bytearray = field(default_factory=bytearray)


@dataclass(eq=False)
class _Job:
    conn: socket.socket
    pid: int
    request: FdRequest


class FdServer:
    """The fd socket: a reader thread and a fixed pool of workers."""

    def __init__(
        self,
        registry: AgentRegistry,
        path: Path,
        loop: asyncio.AbstractEventLoop,
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        export_timeout: float = EXPORT_TIMEOUT,
    ) -> None:
        self.registry = registry
        self.path = path
        self.loop = loop
        self.request_timeout = request_timeout
        self.export_timeout = export_timeout
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(128)
        self.sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.sock, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._waiting: dict[int, _Waiting] = {}  # by fd, oldest first
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._closing = False
        self._refusals = LogBudget()
        self._failures = LogBudget()
        self._threads = [threading.Thread(target=self._serve, name="torpord-fds", daemon=True)]
        self._threads += [
            threading.Thread(target=self._work, name=f"torpord-fds-{i}", daemon=True)
            for i in range(WORKERS)
        ]

    def start(self, mode: int) -> None:
        os.chmod(self.path, mode)
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop listening; what is waiting is answered SHUTTING_DOWN. Called on
        the event loop, so a worker waiting for it is not waited for long."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        reader, *workers = self._threads
        if reader.ident is None:  # never started
            self._selector.close()
            self.sock.close()
            self._wake_r.close()
        else:
            reader.join(5)
        for _ in workers:
            self._jobs.put(None)
        deadline = time.monotonic() + 1
        for thread in workers:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        self._wake_w.close()
        self.path.unlink(missing_ok=True)

    # -- the reader thread --------------------------------------------------------

    def _serve(self) -> None:
        try:
            while not self._closing:
                timeout = None
                if self._waiting:
                    oldest = next(iter(self._waiting.values()))
                    timeout = max(0.0, oldest.deadline - time.monotonic())
                for key, _ in self._selector.select(timeout):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    elif isinstance(key.data, _Waiting) and self._waiting.get(key.fd) is key.data:
                        self._read_or_drop(key.data)  # (unless it was pushed out meanwhile)
                self._expire()
        except Exception:
            log.exception("fd socket: the reader failed; engines can no longer take fds")
        finally:
            for waiting in list(self._waiting.values()):
                self._drop(waiting, Unavailable("the daemon is stopping", reason="SHUTTING_DOWN"))
            self._selector.close()
            self.sock.close()
            self._wake_r.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return  # (ECONNABORTED and the like: that one is gone already)
                # Out of fds: make room, or wait for some to be given back.
                self._refused(f"cannot accept ({err.strerror})", "FD_SOCKET_BUSY")
                if self._waiting:
                    self._push_out()
                else:
                    time.sleep(0.05)
                return
            if len(self._waiting) >= MAX_WAITING:  # the oldest makes room
                self._push_out()
            try:
                pid, _uid, _gid = struct.unpack(
                    "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                )
                conn.setblocking(False)
                waiting = _Waiting(conn, pid, time.monotonic() + self.request_timeout)
                self._selector.register(conn, selectors.EVENT_READ, waiting)
            except OSError:
                conn.close()
                continue
            self._waiting[conn.fileno()] = waiting

    def _read_or_drop(self, waiting: _Waiting) -> None:
        try:
            self._read(waiting)
        except Exception as exc:  # a bug: that connection goes, the reader carries on
            self._failed(exc)
            self._drop(waiting, _internal(exc))

    def _read(self, waiting: _Waiting) -> None:
        """Take what the connection has sent, without waiting for more; once
        its request is all there, check it and queue it for a worker."""
        buffer = waiting.buffer
        size = frame_length(buffer) if len(buffer) >= PREFIX_BYTES else -1
        while size < 0 or len(buffer) < PREFIX_BYTES + size:
            want = PREFIX_BYTES - len(buffer) if size < 0 else PREFIX_BYTES + size - len(buffer)
            try:
                chunk = waiting.conn.recv(min(want, 1 << 16))
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:  # the peer left
                self._drop(waiting, None)
                return
            buffer += chunk
            if size < 0 and len(buffer) == PREFIX_BYTES:
                size = frame_length(buffer)
                if size > MAX_REQUEST:
                    self._drop(waiting, too_long("the request", size, MAX_REQUEST))
                    return
        try:
            request = parse_request(bytes(buffer[PREFIX_BYTES:]))
        except InvalidArgument as err:
            self._drop(waiting, err)
            return
        if self._jobs.qsize() >= MAX_QUEUED:
            self._drop(waiting, _busy())
            return
        self._unwatch(waiting)
        self._jobs.put(_Job(waiting.conn, waiting.pid, request))

    def _push_out(self) -> None:
        """Make room: drop the oldest waiting connection, unless what it has
        sent meanwhile (not yet read: its event may come after this accept's)
        is its whole request."""
        oldest = next(iter(self._waiting.values()))
        self._read_or_drop(oldest)
        if self._waiting.get(oldest.conn.fileno()) is oldest:
            self._drop(oldest, _busy())

    def _expire(self) -> None:
        now = time.monotonic()
        while self._waiting:
            oldest = next(iter(self._waiting.values()))
            if oldest.deadline > now:
                return
            self._drop(
                oldest,
                InvalidArgument(
                    f"no complete request within {self.request_timeout:g}s of connecting",
                    reason="REQUEST_TIMEOUT",
                ),
            )

    def _unwatch(self, waiting: _Waiting) -> None:
        self._waiting.pop(waiting.conn.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(waiting.conn)

    def _drop(self, waiting: _Waiting, error: TorporError | None) -> None:
        """Close a waiting connection, answering `error` if it can be sent
        without waiting (an answer this small fits in the empty buffer)."""
        self._unwatch(waiting)
        with waiting.conn:
            if error is not None:
                if error.reason != "SHUTTING_DOWN":
                    self._refused(error.message, error.reason)
                with contextlib.suppress(OSError):
                    send_error(waiting.conn, error)

    def _failed(self, exc: Exception) -> None:
        skipped = self._failures.take()
        if skipped is not None:
            log.error("fd socket: request failed", exc_info=exc, skipped_since_last=skipped)

    def _refused(self, why: str, reason: str) -> None:
        skipped = self._refusals.take()
        if skipped is not None:
            log.warning(
                "fd socket: request refused", reason=reason, error=why, skipped_since_last=skipped
            )

    # -- the workers ----------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            with job.conn:
                try:
                    job.conn.setblocking(True)
                    job.conn.settimeout(SEND_TIMEOUT)
                    if self._closing:
                        raise Unavailable("the daemon is stopping", reason="SHUTTING_DOWN")
                    self._answer(job)
                except TorporError as err:
                    with contextlib.suppress(OSError):
                        send_error(job.conn, err)
                except OSError as err:
                    self._refused(f"the engine went away ({err.strerror})", "DISCONNECTED")
                except Exception as exc:  # a bug; the worker carries on
                    self._failed(exc)
                    with contextlib.suppress(OSError):
                        send_error(job.conn, _internal(exc))

    def _answer(self, job: _Job) -> None:
        request = job.request
        if request.release:
            released = asyncio.run_coroutine_threadsafe(
                self.registry.late_release(request.attachment_id, job.pid), self.loop
            )
            send_json(job.conn, {"released": self._result(released)})
            return
        future = asyncio.run_coroutine_threadsafe(
            self.registry.export(
                request.attachment_id,
                job.pid,
                list(request.layers),
                request.model_id,
                _peer_pidfd(job.conn, job.pid),
            ),
            self.loop,
        )
        try:
            header, fds = self._result(future)
        except Unavailable:
            # Close the fds of the export when it finishes after all
            # (cancelling it could drop a result already on its way, fds and all).
            future.add_done_callback(_close_late_export)
            raise
        try:
            header["fd_count"] = len(fds)
            send_json(job.conn, header)
            for at in range(0, len(fds), FDS_PER_MESSAGE):
                socket.send_fds(job.conn, [b"F"], fds[at : at + FDS_PER_MESSAGE])
        finally:
            for fd in fds:
                os.close(fd)

    def _result(self, future: concurrent.futures.Future[T]) -> T:
        try:
            return future.result(self.export_timeout)
        except concurrent.futures.TimeoutError:  # the event loop is stuck
            raise Unavailable(
                f"the daemon did not answer within {self.export_timeout:g}s; try again",
                reason="DAEMON_BUSY",
            ) from None


def _internal(exc: Exception) -> TorporError:
    return TorporError(f"internal error: {type(exc).__name__}", reason="INTERNAL")


def _busy() -> Unavailable:
    return Unavailable(
        "the fd socket has too many connections waiting; try again", reason="FD_SOCKET_BUSY"
    )


SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux >= 6.5


def _peer_pidfd(conn: socket.socket, pid: int) -> int | None:
    """A pidfd of the process at the other end: from the socket itself where the
    kernel can (no pid-reuse race), else by its pid while it is connected."""
    try:
        return int(conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError:
        pass
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _close_late_export(future: concurrent.futures.Future[tuple[dict[str, Any], list[int]]]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    for fd in future.result()[1]:
        os.close(fd)
