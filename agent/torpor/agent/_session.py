"""An attachment's conversation with the daemon: the Attach stream, the fd
socket, and attaching again.

The session opens the stream (Hello; the daemon answers Attached), maps what
is on the device, then follows the daemon's instructions on a thread of its
own: a Quiesce closes the gate and acknowledges once the layers are unmapped,
a Resume maps the layers named, and the stream's end ends the attachment.
Unmapping and mapping go through the gate (`torpor.agent._gate`) and the
layout (`torpor.agent._layout`); the session never decides when.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

import grpc

from torpor.agent._activity import Reporter, report
from torpor.agent._fdsocket import request_fds, request_release
from torpor.agent._gate import Gate, Usage
from torpor.agent._layout import Layout, layout_changed
from torpor.client import Client
from torpor.errors import TorporError, from_rpc_error
from torpor.v1 import agent_pb2, agent_pb2_grpc

__all__ = ["Callback", "Session", "let_go_error", "moved"]

# A library: stdlib logging, silent unless the engine configures it.
log = logging.getLogger("torpor.agent")

Callback = Callable[[list[str]], None]


class Session:
    """The stream and fd-socket side of one attachment (see AttachedModel)."""

    def __init__(
        self,
        model_id: str,
        *,
        client: Client,
        gate: Gate,
        layout: Layout,
        engine: str,
        rank: int,
        timeout: float,
        publish: agent_pb2.Publish | None = None,
    ) -> None:
        self.model_id = model_id
        # While publishing (until the commit): what the first Hello says.
        self.publish = publish
        self._published = threading.Event()
        self.client = client
        self.timeout = timeout
        self.on_quiesce: list[Callback] = []
        self.on_resume: list[Callback] = []
        self.listener: threading.Thread | None = None
        self._gate, self._layout = gate, layout
        self._engine, self._rank = engine, rank
        self._call: Any = None
        self._lock = threading.Lock()  # (_said_release)
        self._said_release = False  # (Release, on the stream or late)
        self.attachment_id = ""
        self.fd_socket = ""
        self._attached = False
        # What the first answer said; a reattach must find the same.
        self.layout_hash = ""
        self.slab_kind = ""
        self.device = ""
        self.device_index = 0
        # The use() blocks, reported on the stream (see torpor.agent._activity).
        self._reporter = Reporter(f"torpor-activity-{model_id}", gate.usage, self._report)
        gate.on_usage = self._reporter.poke

    def _report(self, usage: Usage) -> None:
        self._requests.put(report(usage))

    def attach(self) -> agent_pb2.Attached:
        """Open the stream; the daemon's answer, whose layout this session keeps."""
        attached = self._open()
        self.layout_hash = attached.layout_hash
        self.slab_kind = attached.slab_kind or "memfd"
        self.device_index = attached.device_index
        self.device = attached.device.removeprefix("devices/")  # the GPU's UUID
        return attached

    def _open(self) -> agent_pb2.Attached:
        """A new Attach stream; its first answer."""
        self._requests: queue.SimpleQueue[agent_pb2.AttachRequest | None] = queue.SimpleQueue()
        self._requests.put(
            agent_pb2.AttachRequest(
                hello=agent_pb2.Hello(
                    model_id=self.model_id,
                    pid=os.getpid(),
                    engine=self._engine,
                    rank=self._rank,
                    publish=self.publish,
                )
            )
        )
        stub = agent_pb2_grpc.AgentServiceStub(self.client.channel)
        # grpc-stubs types the stream as a CallIterator without __next__; it has one.
        self._call = cast(Any, stub.Attach(iter(self._requests.get, None)))
        attached: agent_pb2.Attached = next(self._call).attached
        self.attachment_id = attached.attachment_id
        self.fd_socket = attached.fd_socket
        self._attached = True
        self._said_release = False
        return attached

    def start(self) -> None:
        """Map what is on the device, then follow the daemon's instructions."""
        self.map([])
        self.listener = threading.Thread(
            target=self._listen, name=f"torpor-agent-{self.model_id}", daemon=True
        )
        self.listener.start()
        self._reporter.start()

    def reattach(self) -> None:
        """Attach again after the attachment ended (see AttachedModel.reattach)."""
        if not self._gate.needs_reattach():
            return
        if self.listener is not None:
            self.listener.join(self.timeout)
        self._end_stream()  # the old one
        try:
            attached = self._open()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        why = moved(self.model_id, self.slab_kind, self.device, attached)
        if attached.layout_hash != self.layout_hash or why is not None:
            self._end_stream()
            raise why or layout_changed(self.model_id)
        self.device_index = attached.device_index
        self._gate.reopen()
        try:
            self.start()
        except BaseException:
            self._gate.fail(
                TorporError(grpc.StatusCode.UNAVAILABLE, "REATTACH_FAILED", "reattach failed")
            )
            self._end_stream()
            raise

    def let_go(self) -> bool:
        """End the attachment here, keeping its ranges (see AttachedModel.let_go);
        False, doing nothing, if it had ended already."""
        with self._gate.quiescing():
            for callback in self.on_quiesce:
                try:
                    callback([])
                except Exception:
                    log.exception("on_quiesce callback failed (model %s)", self.model_id)
            self._gate.drain([], self.timeout)  # (every layer unmapped, none in use)
            if self._gate.end(let_go_error(self.model_id)) is None:
                return False
        with self._lock:
            self._said_release = True
        self._reporter.flush()  # (the blocks that ended; none is open now)
        # Release, then our end of the stream: the daemon detaches this engine,
        # which then holds nothing, and ends the stream.
        self._requests.put(agent_pb2.AttachRequest(release=agent_pb2.Release()))
        self._requests.put(None)
        if self.listener is not None and self.listener is not threading.current_thread():
            self.listener.join(self.timeout)
        self._call.cancel()
        return True

    def close(self, *, released: bool, stream_over: bool) -> None:
        """End the stream as the engine detaches (the gate is closed already):
        say Release first if nothing stays mapped here, or say it on the fd
        socket if the stream was over already."""
        listener = self.listener
        self._reporter.stop()
        if self._call is not None:
            self._reporter.flush()  # the last report, before Release
            if released and not stream_over:
                # Said last, so the daemon knows nothing stays mapped here (on a
                # GPU it would otherwise count this process as holding memory).
                self._requests.put(agent_pb2.AttachRequest(release=agent_pb2.Release()))
                self._said_release = True
            self._requests.put(None)
            if listener is not None and listener is not threading.current_thread():
                listener.join(2)  # the daemon ends the stream once it has read ours
            self._call.cancel()
        if listener is not None and listener is not threading.current_thread():
            listener.join(5)
        if released and stream_over:
            self.let_go_late()

    def let_go_late(self) -> None:
        """Everything is unmapped, but the stream ended before the agent could
        say Release: say it on the fd socket instead (best effort), so memory a
        GPU daemon counts as held for this process is free again."""
        with self._lock:
            if self._said_release or not self._attached:
                return
            self._said_release = True
            fd_socket, attachment_id = self.fd_socket, self.attachment_id
        try:
            request_release(fd_socket, attachment_id, timeout=5)
        except (OSError, ValueError, TorporError) as err:  # the daemon is gone, say
            log.info("could not tell the daemon the slabs are let go: %s", err)

    def map(self, names: Sequence[str]) -> list[str]:
        """Ask the daemon for the slabs of `names` (every layer on the device if
        empty) and map each at its range; returns the layers mapped."""
        header, fds = request_fds(
            self.fd_socket,
            self.attachment_id,
            list(names),
            model_id=self.model_id,
            timeout=self.timeout,
        )
        try:
            if header.get("layout_hash", self.layout_hash) != self.layout_hash:
                raise layout_changed(self.model_id)
            got = [str(layer["name"]) for layer in header["layers"]]
            writable = bool(header.get("writable", False))
            if writable and self.publish is None:  # (never: the daemon gives them to publishers)
                raise layout_changed(self.model_id)
            if not self._gate.apply(
                lambda: self._layout.map(header["layers"], fds, writable=writable)
            ):
                return []  # closed meanwhile
            return got
        finally:
            for fd in fds:
                os.close(fd)

    def _end_stream(self) -> None:
        self._requests.put(None)  # the stream's request thread ends
        self._call.cancel()

    def _listen(self) -> None:
        """The daemon's instructions, in order, for the life of the stream."""
        ended: TorporError | None = None
        try:
            for message in self._call:
                if message.HasField("quiesce"):
                    self.quiesce(message.quiesce)
                elif message.HasField("resume"):
                    self.resume(message.resume)
                elif message.HasField("published"):
                    self._published.set()
        except grpc.RpcError as err:
            ended = from_rpc_error(err)
        except TorporError as err:
            ended = err
        except Exception as err:  # a bug of ours must not leave waiters hanging
            log.exception("agent listener for %s failed", self.model_id)
            ended = TorporError(grpc.StatusCode.INTERNAL, "AGENT_FAILED", str(err))
        if ended is None:
            ended = TorporError(grpc.StatusCode.UNAVAILABLE, "STREAM_ENDED", "the daemon went away")
        else:
            # Ended here (a local error): end the stream too, so the daemon
            # detaches this engine now rather than waiting on it.
            self._end_stream()
        idle = self._gate.end(ended)
        if idle is None:
            return  # close() got here first
        log.info("attachment to %s ended: %s (%s)", self.model_id, ended.message, ended.reason)
        if idle:
            self.let_go_late()

    def commit(self) -> None:
        """Publishing: let go of the writable slabs (after the use() blocks
        end), have the daemon seal and checksum them, and map them again,
        read-only, at the same addresses. A refusal (the stream ends with
        it) is raised, and the model is gone."""
        if self.publish is None:
            raise TorporError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "NOT_PUBLISHING",
                f"this attachment is not publishing {self.model_id!r}",
            )
        with self._gate.quiescing():
            self._gate.drain([], None)  # (the daemon can't seal what is mapped writable)
            self._requests.put(agent_pb2.AttachRequest(commit=agent_pb2.Commit()))
            # Checksumming takes a while for big images: as long as the stream lasts.
            while not self._published.wait(0.05):
                if self._gate.ended is not None:
                    raise self._gate.ended
        self.publish = None
        self.map([])

    def quiesce(self, quiesce: agent_pb2.Quiesce) -> None:
        """Let go of the layers named (every layer if none): the engine's
        callbacks, then the gate drains, then the acknowledgement."""
        names = list(quiesce.layers)
        timeout = quiesce.timeout.ToNanoseconds() / 1e9 if quiesce.HasField("timeout") else None
        with self._gate.quiescing():
            for callback in self.on_quiesce:
                try:
                    callback(names)
                except Exception:
                    log.exception("on_quiesce callback failed (model %s)", self.model_id)
            # Past the daemon's deadline it revokes the attachment anyway: the
            # gate stops waiting then.
            self._gate.drain(names, timeout)
        self._requests.put(
            agent_pb2.AttachRequest(quiesce_ack=agent_pb2.QuiesceAck(sequence=quiesce.sequence))
        )

    def resume(self, resume: agent_pb2.Resume) -> None:
        """Map the layers named, at the same addresses, then tell the engine."""
        if resume.layout_hash != self.layout_hash:
            raise layout_changed(self.model_id)
        try:
            mapped = self.map(list(resume.layers))
        except TorporError as err:
            if err.reason == "LAYOUT_CHANGED":
                raise
            # The layers moved again meanwhile (a failed wake rolled back);
            # the daemon's next instruction says what holds now.
            log.warning("resume of %s: slabs not available: %s", self.model_id, err)
            return
        for callback in self.on_resume:
            try:
                callback(mapped)
            except Exception:
                log.exception("on_resume callback failed (model %s)", self.model_id)


def let_go_error(model_id: str) -> TorporError:
    """Why an attachment that the engine let go of is over (until a reattach)."""
    return TorporError(
        grpc.StatusCode.CANCELLED,
        "LET_GO",
        f"this engine let go of {model_id!r}; reattach to use it again",
    )


def moved(
    model_id: str, slab_kind: str, device: str, attached: agent_pb2.Attached
) -> TorporError | None:
    """Why an attachment's tensors can't be valid again on what `attached` offers,
    or None. Host memory is host memory wherever the emulated device is; a GPU's
    tensors belong to that GPU, so the model must be back on the same one."""
    kind = attached.slab_kind or "memfd"
    now = attached.device.removeprefix("devices/")
    if kind == slab_kind and (kind != "cuda" or now == device):
        return None
    was = f"{slab_kind} slabs on {device}" if slab_kind == "cuda" else f"{slab_kind} slabs"
    is_ = f"{kind} slabs on {now}" if kind == "cuda" else f"{kind} slabs"
    return TorporError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "DEVICE_CHANGED",
        f"model {model_id!r} is now in {is_}; this engine's tensors are in {was} and"
        " cannot move: load it on that device, or attach again",
    )
