"""Attach an engine to a model the daemon holds and get its weights as tensors.

    from torpor.agent import attach

    model = attach("llama")
    module.load_state_dict(model.state_dict(), assign=True)   # no copy
    with model.use():                                          # weights stay mapped
        out = module(x)

Nothing is copied: each layer's slab is mapped read-only at an address this
process reserved for it once, and the tensors are views on those addresses.

The daemon may take the weights away (Sleep, Offload, Unload) and bring them
back (Wake, Offload to DEVICE). Before it does, it asks the agent to quiesce:
the agent calls the engine's `on_quiesce` callbacks, waits for every `use()`
block to end, unmaps the layers (their ranges fault on access until they come
back) and acknowledges. As each layer is back on the device the daemon says
so and the agent maps it at the same address: tensors, and anything that
holds their addresses (CUDA graphs), stay valid. `wait_layer` lets an engine
run a layer as soon as it is back (progressive wake; see
`torpor.agent.modules.wait_hooks`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import grpc

from torpor.agent.mapping import SlabRange
from torpor.client import Client
from torpor.errors import TorporError, from_rpc_error
from torpor.v1 import agent_pb2, agent_pb2_grpc, models_pb2

if TYPE_CHECKING:
    import torch

__all__ = ["AttachedModel", "attach", "request_fds"]

# A library: stdlib logging, silent unless the engine configures it.
log = logging.getLogger("torpor.agent")

Callback = Callable[[list[str]], None]


@dataclass
class _Layer:
    name: str
    index: int
    range: SlabRange


class AttachedModel:
    """One engine process's attachment to one model.

    Thread-safe: `use`, `wait_layer` and `state_dict` may be called from any
    thread; the daemon's instructions are handled on a thread of the agent.
    """

    def __init__(
        self,
        model_id: str,
        *,
        client: Client | None = None,
        engine: str = "",
        rank: int = 0,
        timeout: float = 60.0,
    ) -> None:
        self.model_id = model_id
        self.timeout = timeout
        self._own_client = client is None
        self.client = client or Client()
        self._cond = threading.Condition()
        self._users = 0  # use() blocks running
        self._held = threading.local()  # .depth: this thread's use() blocks
        self._quiescing = False
        self._ended: TorporError | None = None  # why the attachment is over
        self._on_quiesce: list[Callback] = []
        self._on_resume: list[Callback] = []
        self._layers: dict[str, _Layer] = {}
        self._order: list[str] = []  # layer names in forward order
        self._tensors: dict[str, torch.Tensor] = {}
        self._tensor_layer: dict[str, str] = {}
        self._engine, self._rank = engine, rank
        self._closed = False
        try:
            attached = self._open()
            self.layout_hash: str = attached.layout_hash
            self.slab_kind: str = attached.slab_kind or "memfd"
            self.device_index: int = attached.device_index
            self.device: str = attached.device.removeprefix("devices/")  # the GPU's UUID
            self._ordinal: int | None = None  # this process's CUDA number for it
            self._reserve()
            self._start()
        except grpc.RpcError as err:
            self.close()
            raise from_rpc_error(err) from None
        except BaseException:
            self.close()
            raise

    def _open(self) -> agent_pb2.Attached:
        """A new Attach stream; its first answer."""
        self._requests: queue.SimpleQueue[agent_pb2.AttachRequest | None] = queue.SimpleQueue()
        self._requests.put(
            agent_pb2.AttachRequest(
                hello=agent_pb2.Hello(
                    model_id=self.model_id, pid=os.getpid(), engine=self._engine, rank=self._rank
                )
            )
        )
        stub = agent_pb2_grpc.AgentServiceStub(self.client.channel)
        # grpc-stubs types the stream as a CallIterator without __next__; it has one.
        self._call: Any = cast(Any, stub.Attach(iter(self._requests.get, None)))
        attached: agent_pb2.Attached = next(self._call).attached
        self.attachment_id: str = attached.attachment_id
        self.fd_socket: str = attached.fd_socket
        self._said_release = False  # (Release, on the stream or late)
        return attached

    def _start(self) -> None:
        """Map what is on the device, then follow the daemon's instructions."""
        self._map([])
        self._listener = threading.Thread(
            target=self._listen, name=f"torpor-agent-{self.model_id}", daemon=True
        )
        self._listener.start()

    def reattach(self) -> None:
        """Attach again after the attachment ended (the daemon restarted and the
        model was loaded again, or it was unloaded and loaded again): the same
        layout is mapped at the same addresses, so the tensors, and anything
        holding their addresses, are valid again. A model whose layout differs
        is FAILED_PRECONDITION LAYOUT_CHANGED, one now on another GPU (or in
        another kind of memory) DEVICE_CHANGED: attach anew instead."""
        with self._cond:
            if self._closed:
                raise TorporError(grpc.StatusCode.FAILED_PRECONDITION, "DETACHED", "closed")
            if self._ended is None:
                return
        self._listener.join(self.timeout)
        self._requests.put(None)  # the old stream's request thread ends
        self._call.cancel()
        try:
            attached = self._open()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        moved = _moved(self.model_id, self.slab_kind, self.device, attached)
        if attached.layout_hash != self.layout_hash or moved is not None:
            self._requests.put(None)
            self._call.cancel()
            raise moved or _layout_changed(self.model_id)
        self.device_index = attached.device_index
        with self._cond:
            self._ended = None
        try:
            self._start()
        except BaseException:
            with self._cond:
                self._ended = TorporError(
                    grpc.StatusCode.UNAVAILABLE, "REATTACH_FAILED", "reattach failed"
                )
            self._requests.put(None)
            self._call.cancel()
            raise

    # -- what the engine uses ------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        """The model's layer names in forward order ("pre", "layers.0", …, "post")."""
        return list(self._order)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the model by name: views on the daemon's slabs, at
        addresses that stay the same for the life of the attachment."""
        return dict(self._tensors)

    def layer_of(self, tensor_name: str) -> str:
        """The layer a tensor belongs to."""
        return self._tensor_layer[tensor_name]

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Each layer's reserved address range: name -> (address, size)."""
        return {name: (lay.range.address, lay.range.size) for name, lay in self._layers.items()}

    def ready(self, layer: str | int | None = None) -> bool:
        """Whether a layer (or, with none given, every layer) is mapped now."""
        with self._cond:
            if layer is None:
                return all(lay.range.mapped for lay in self._layers.values())
            return self._layer(layer).range.mapped

    @property
    def ended(self) -> TorporError | None:
        """Why the attachment is over (revoked, model unloaded, daemon stopped),
        or None while it lasts."""
        return self._ended

    def wait_layer(self, layer: str | int, timeout: float | None = None) -> None:
        """Block until a layer (by name, or index in forward order) is mapped.

        Raises TorporError: DEADLINE_EXCEEDED after `timeout`; ABORTED
        (WEIGHTS_WITHDRAWN) when the daemon takes the weights away meanwhile
        (a Sleep, or a failed Wake rolled back): the caller should end its
        `use()` block; or why the attachment ended."""
        lay = self._layer(layer)
        if lay.range.mapped and self._ended is None:  # every forward pre-hook's path
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._check_usable()
                if lay.range.mapped:
                    return
                if self._quiescing:
                    raise _withdrawn(self.model_id)
                if not self._cond.wait(_left(deadline)) and _left(deadline) == 0:
                    raise TorporError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "LAYER_NOT_READY",
                        f"layer {lay.name} of {self.model_id!r} did not come back within"
                        f" {timeout:g}s",
                    )

    @contextlib.contextmanager
    def use(self, *, wait: bool = True, timeout: float | None = None) -> Iterator[None]:
        """Hold the weights for the length of the block: the daemon's requests to
        let go wait until it ends. With `wait`, first wait until every layer
        is mapped; without, layers are awaited one by one (`wait_layer`, or the
        hooks of `torpor.agent.modules.wait_hooks`) as a progressive wake
        brings them back."""
        deadline = None if timeout is None else time.monotonic() + timeout
        depth: int = getattr(self._held, "depth", 0)
        with self._cond:
            while True:
                self._check_usable()
                if depth:
                    # Nested in a block of this thread, which holds the weights
                    # already: a pending quiesce waits for that block, so this
                    # one must not wait for the quiesce.
                    if not wait or self._all_mapped():
                        break
                    if self._quiescing:
                        raise _withdrawn(self.model_id)
                elif not self._quiescing and (not wait or self._all_mapped()):
                    break
                if not self._cond.wait(_left(deadline)) and _left(deadline) == 0:
                    raise TorporError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "WEIGHTS_NOT_READY",
                        f"the weights of {self.model_id!r} did not come back within {timeout:g}s",
                    )
            self._users += 1
        self._held.depth = depth + 1
        try:
            yield
        finally:
            self._held.depth = depth
            with self._cond:
                self._users -= 1
                over = self._users == 0 and self._ended is not None
                if over:
                    if self._closed:
                        self._release()
                    else:
                        self._unmap_if_idle()
                self._cond.notify_all()
            if over:
                self._let_go_late()

    def on_quiesce(self, callback: Callback) -> Callback:
        """Call `callback(layers)` when the daemon is about to take layers away
        (an empty list means every layer), before the agent waits for the
        `use()` blocks to end: the engine stops starting new work. Runs on the
        agent's thread; usable as a decorator."""
        self._on_quiesce.append(callback)
        return callback

    def on_resume(self, callback: Callback) -> Callback:
        """Call `callback(layers)` once layers are mapped again."""
        self._on_resume.append(callback)
        return callback

    def close(self) -> None:
        """Detach. The tensors from state_dict() must not be used after this.
        Use() blocks running in other threads keep the weights mapped until the
        last of them ends; the address ranges are released then."""
        with self._cond:
            self._closed = True  # (the listener maps nothing more)
            stream_over = self._ended is not None
            if self._ended is None:
                self._ended = TorporError(
                    grpc.StatusCode.CANCELLED, "DETACHED", "the engine detached"
                )
            released = self._users == 0
            failed: BaseException | None = None
            if released:
                try:
                    self._release()
                except Exception as err:  # (a broken CUDA context): still detach
                    failed, released = err, False
            self._cond.notify_all()
        listener = getattr(self, "_listener", None)
        if hasattr(self, "_call"):
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
            self._let_go_late()
        if self._own_client:
            self.client.close()
        if failed is not None:
            raise failed

    def _let_go_late(self) -> None:
        """Everything is unmapped, but the stream ended before the agent could
        say Release: say it on the fd socket instead (best effort), so memory a
        GPU daemon counts as held for this process is free again."""
        with self._cond:
            if self._said_release or not hasattr(self, "attachment_id"):
                return
            self._said_release = True
            fd_socket, attachment_id = self.fd_socket, self.attachment_id
        try:
            request_release(fd_socket, attachment_id, timeout=5)
        except (OSError, ValueError, TorporError) as err:  # the daemon is gone, say
            log.info("could not tell the daemon the slabs are let go: %s", err)

    def _release(self) -> None:
        for lay in self._layers.values():
            lay.range.release()
        self._layers.clear()
        self._tensors.clear()

    def __enter__(self) -> AttachedModel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- inside ------------------------------------------------------------------------

    def _layer(self, layer: str | int) -> _Layer:
        name = self._order[layer] if isinstance(layer, int) else layer
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(f"model {self.model_id!r} has no layer {layer!r}") from None

    def _all_mapped(self) -> bool:
        return all(lay.range.mapped for lay in self._layers.values())

    def _check_usable(self) -> None:
        if self._ended is not None:
            raise self._ended

    def _reserve(self) -> None:
        """One address range per layer, reserved for the life of the attachment,
        and the tensors on them (valid whenever their layer is mapped)."""
        model = self.client.get_model(self.model_id, view=models_pb2.MODEL_VIEW_FULL)
        for index, layer in enumerate(model.layers):
            lay = _Layer(layer.name, index, self._range(int(layer.size_bytes)))
            self._layers[layer.name] = lay
            self._order.append(layer.name)
            for t in layer.tensors:
                self._tensors[t.name] = lay.range.tensor(t.slab_offset, t.dtype, list(t.shape))
                self._tensor_layer[t.name] = layer.name

    def _range(self, size: int) -> SlabRange:
        if self.slab_kind == "cuda":
            from torpor.agent.cuda import CudaSlabRange, ordinal_of

            if self._ordinal is None:
                self._ordinal = ordinal_of(self.device) if self.device else self.device_index
            return cast(SlabRange, CudaSlabRange(size, self._ordinal))
        if self.slab_kind != "memfd":
            raise TorporError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "UNSUPPORTED_SLABS",
                f"this agent cannot map {self.slab_kind!r} slabs: upgrade torpor",
            )
        return SlabRange(size)

    def _map(self, names: Sequence[str]) -> list[str]:
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
                raise _layout_changed(self.model_id)
            got = [str(layer["name"]) for layer in header["layers"]]
            with self._cond:
                if self._closed:
                    return []
                for layer, fd in zip(header["layers"], fds, strict=True):
                    lay = self._layers.get(layer["name"])
                    if lay is None or int(layer["size"]) != lay.range.size:
                        raise _layout_changed(self.model_id, layer["name"])
                    lay.range.map(fd)
                self._cond.notify_all()
            return got
        finally:
            for fd in fds:
                os.close(fd)

    def _listen(self) -> None:
        """The daemon's instructions, in order, for the life of the stream."""
        ended: TorporError | None = None
        try:
            for message in self._call:
                if message.HasField("quiesce"):
                    self._quiesce(message.quiesce)
                elif message.HasField("resume"):
                    self._resume(message.resume)
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
            self._requests.put(None)
            self._call.cancel()
        self._end(ended)

    def _end(self, err: TorporError) -> None:
        with self._cond:
            if self._ended is not None and self._ended is not err:
                return  # close() got here first
            self._ended = err
            # Whatever ended it (revoked, model unloaded, daemon stopped or
            # crashed), the weights are no longer the daemon's to give: unmap,
            # now or when the last use() block ends, so a stray access faults
            # and no orphaned memory stays alive through this process.
            idle = self._users == 0
            self._unmap_if_idle()
            self._cond.notify_all()
        log.info("attachment to %s ended: %s (%s)", self.model_id, err.message, err.reason)
        if idle:
            self._let_go_late()

    def _unmap_if_idle(self) -> None:
        if self._users == 0:
            for lay in self._layers.values():
                if lay.range.mapped:
                    lay.range.unmap()

    def _quiesce(self, quiesce: agent_pb2.Quiesce) -> None:
        names = list(quiesce.layers)
        with self._cond:
            self._quiescing = True
            self._cond.notify_all()  # wait_layer() callers give up
        try:
            for callback in self._on_quiesce:
                try:
                    callback(names)
                except Exception:
                    log.exception("on_quiesce callback failed (model %s)", self.model_id)
            # Past the daemon's deadline it revokes the attachment anyway: stop
            # waiting then, so the engine's waiters learn why at once.
            deadline = (
                time.monotonic() + quiesce.timeout.ToNanoseconds() / 1e9
                if quiesce.HasField("timeout")
                else None
            )
            with self._cond:
                while self._users:
                    timed_out = not self._cond.wait(_left(deadline))
                    if timed_out and self._users and _left(deadline) == 0:
                        self._ended = TorporError(
                            grpc.StatusCode.ABORTED,
                            "QUIESCE_TIMEOUT",
                            f"use() blocks still held the weights of {self.model_id!r}"
                            f" {quiesce.timeout.ToNanoseconds() / 1e9:g}s after the daemon"
                            " asked for them; the attachment is revoked",
                        )
                        raise self._ended
                for lay in self._layers.values():
                    if (not names or lay.name in names) and lay.range.mapped:
                        lay.range.unmap()
        finally:
            with self._cond:
                self._quiescing = False
                self._cond.notify_all()
        self._requests.put(
            agent_pb2.AttachRequest(quiesce_ack=agent_pb2.QuiesceAck(sequence=quiesce.sequence))
        )

    def _resume(self, resume: agent_pb2.Resume) -> None:
        if resume.layout_hash != self.layout_hash:
            raise _layout_changed(self.model_id)
        try:
            mapped = self._map(list(resume.layers))
        except TorporError as err:
            if err.reason == "LAYOUT_CHANGED":
                raise
            # The layers moved again meanwhile (a failed wake rolled back);
            # the daemon's next instruction says what holds now.
            log.warning("resume of %s: slabs not available: %s", self.model_id, err)
            return
        for callback in self._on_resume:
            try:
                callback(mapped)
            except Exception:
                log.exception("on_resume callback failed (model %s)", self.model_id)


def attach(model_id: str, **kwargs: Any) -> AttachedModel:
    """Attach this process to a model (see AttachedModel)."""
    return AttachedModel(model_id, **kwargs)


def _withdrawn(model_id: str) -> TorporError:
    return TorporError(
        grpc.StatusCode.ABORTED,
        "WEIGHTS_WITHDRAWN",
        f"the daemon is taking the weights of {model_id!r} away",
    )


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _layout_changed(model_id: str, layer: str = "") -> TorporError:
    what = f"layer {layer} of " if layer else ""
    return TorporError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "LAYOUT_CHANGED",
        f"the layout of {what}model {model_id!r} changed since this engine attached;"
        " its tensors cannot be remapped: attach again",
    )


def _moved(
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


def request_fds(
    fd_socket: str,
    attachment_id: str,
    layers: list[str] | None = None,
    *,
    model_id: str = "",
    timeout: float = 60.0,
) -> tuple[dict[str, Any], list[int]]:
    """Ask the daemon's fd socket for the slabs of an attachment: (header, fds).

    The header lists the layers sent (name, size; one fd each, in order) and
    those asked for but not on the device ("absent")."""
    request = {"attachment_id": attachment_id, "model_id": model_id, "layers": layers or []}
    with _ask_fd_socket(fd_socket, request, timeout) as (conn, header):
        fds: list[int] = []
        try:
            while len(fds) < header["fd_count"]:
                _, got, _, _ = socket.recv_fds(conn, 1, header["fd_count"] - len(fds))
                if not got:
                    raise TorporError(
                        grpc.StatusCode.UNAVAILABLE, "FDS_TRUNCATED", "the daemon sent too few fds"
                    )
                fds.extend(got)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return header, fds


def request_release(fd_socket: str, attachment_id: str, *, timeout: float = 5.0) -> bool:
    """Tell the daemon's fd socket that this process unmapped every slab of an
    attachment whose stream has ended; whether it was holding any for it."""
    request = {"attachment_id": attachment_id, "release": True}
    with _ask_fd_socket(fd_socket, request, timeout) as (_, answer):
        return bool(answer.get("released"))


@contextlib.contextmanager
def _ask_fd_socket(
    fd_socket: str, request: dict[str, Any], timeout: float
) -> Iterator[tuple[socket.socket, dict[str, Any]]]:
    """Send one length-prefixed JSON request; yields the connection and the
    daemon's answer, or raises the error it answered with. A daemon too busy
    to take the connection (its backlog full, or FD_SOCKET_BUSY: it pushes
    out idle connections when too many wait) is asked again until `timeout`."""
    body = json.dumps(request).encode()
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            try:
                conn.connect(fd_socket)
                conn.sendall(struct.pack("<I", len(body)) + body)
                answer = _recv_json(conn)
            except BlockingIOError:  # (a Unix socket's full backlog, with a timeout set)
                answer = {"error": {"code": "UNAVAILABLE", "reason": "FD_SOCKET_BUSY",
                                    "message": "the fd socket's backlog is full"}}  # fmt: skip
            error = answer.get("error")
            if error is None:
                yield conn, answer
                return
            if error["reason"] != "FD_SOCKET_BUSY" or time.monotonic() + pause > deadline:
                raise TorporError(
                    getattr(grpc.StatusCode, error["code"], grpc.StatusCode.UNKNOWN),
                    error["reason"],
                    error["message"],
                )
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def _recv_json(conn: socket.socket) -> dict[str, Any]:
    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the daemon closed the fd socket mid-message")
            out += chunk
        return out

    (n,) = struct.unpack("<I", exact(4))
    value = json.loads(exact(n))
    if not isinstance(value, dict):
        raise ValueError("bad answer on the fd socket")
    return value
