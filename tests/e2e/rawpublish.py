"""A raw engine on the Attach stream and the fd socket: torpor.v1 messages
and nothing of the agent's, so a test can say what the agent never would
(commit twice, commit while still mapping, a catalogue at the limits)."""

from __future__ import annotations

import mmap
import os
import queue
import threading
from collections.abc import Sequence
from typing import Any

import grpc
from torpor import Client
from torpor.agent import request_fds
from torpor.errors import TorporError, from_rpc_error
from torpor.v1 import agent_pb2, agent_pb2_grpc

WAIT = 60.0  # seconds for the daemon's next message (a bound, not a timing check)


def catalogue(
    fingerprint: str, groups: Sequence[tuple[str, int]], *, tensors: int = 1
) -> agent_pb2.Publish:
    """`groups` of (name, size): each holds `tensors` U8 tensors of one byte
    and the first one spans the whole group."""
    out = agent_pb2.Publish(fingerprint=fingerprint)
    for name, size in groups:
        group = out.groups.add(name=name, size_bytes=size)
        group.tensors.add(name=f"{name}.w", dtype="U8", shape=[size], slab_offset=0)
        for i in range(1, tensors):
            group.tensors.add(name=f"{name}.t{i}", dtype="U8", shape=[0], slab_offset=0)
    return out


class Stream:
    """One Attach stream, its answers read on a thread into a queue."""

    def __init__(self, client: Client, hello: agent_pb2.Hello) -> None:
        self._requests: queue.SimpleQueue[agent_pb2.AttachRequest | None] = queue.SimpleQueue()
        self._requests.put(agent_pb2.AttachRequest(hello=hello))
        stub = agent_pb2_grpc.AgentServiceStub(client.channel)
        self._call: Any = stub.Attach(iter(self._requests.get, None))
        self._answers: queue.SimpleQueue[agent_pb2.AttachResponse | TorporError | None] = (
            queue.SimpleQueue()
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        first = self.next()
        self.attached = first.attached
        self.ended: TorporError | None = None

    def _read(self) -> None:
        try:
            for answer in self._call:
                self._answers.put(answer)
            self._answers.put(None)
        except grpc.RpcError as err:
            self._answers.put(from_rpc_error(err))

    def next(self) -> agent_pb2.AttachResponse:
        """The daemon's next message; its error (TorporError) if the stream
        ended with one."""
        got = self._answers.get(timeout=WAIT)
        if isinstance(got, TorporError):
            self.ended = got
            raise got
        if got is None:
            raise EOFError("the stream ended without an error")
        return got

    def end_error(self) -> TorporError:
        """The error the stream ends with (messages before it are skipped)."""
        while True:
            try:
                self.next()
            except TorporError as err:
                return err

    def send(self, **fields: Any) -> None:
        self._requests.put(agent_pb2.AttachRequest(**fields))

    def commit(self) -> None:
        self.send(commit=agent_pb2.Commit())

    def fds(self, layers: Sequence[str] = ()) -> tuple[dict[str, Any], list[int]]:
        return request_fds(
            self.attached.fd_socket, self.attached.attachment_id, list(layers), timeout=WAIT
        )

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._reader.join(WAIT)


def publisher(client: Client, model_id: str, publish: agent_pb2.Publish) -> Stream:
    return Stream(client, agent_pb2.Hello(model_id=model_id, pid=os.getpid(), publish=publish))


def write_all(stream: Stream, fill: int = 7) -> dict[str, bytes]:
    """Take the writable slabs, fill each with `fill`, and unmap them (as a
    publisher does before its commit); what each layer now holds."""
    header, fds = stream.fds()
    assert header["writable"] is True
    out = {}
    try:
        for layer, fd in zip(header["layers"], fds, strict=True):
            size = layer["size"]
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                mm[:] = bytes([fill]) * size
            out[layer["name"]] = bytes([fill]) * size
    finally:
        for fd in fds:
            os.close(fd)
    return out
