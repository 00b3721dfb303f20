"""Engines attached to models: the Attach stream's registry and the fd socket.

A gRPC stream cannot carry file descriptors, so slabs travel over a second
Unix socket beside the daemon's (`<socket>.fds`, torpord.server.fdsocket). An engine first attaches
over gRPC (AgentService.Attach, saying which pid it is) and gets an
attachment id; it then asks the fd socket for the slabs with that id. The
daemon reads the asking process's pid from the socket itself (SO_PEERCRED)
and hands fds only to the process that attached. Requests and answers are
length-prefixed JSON; never pickle.

The registry is also the core's `Engines`: before the manager moves or frees
device slabs it asks each attached engine to quiesce (a Quiesce on its
stream, answered by QuiesceAck once it has unmapped), detaching the ones that
don't answer in time; as layers land on the device it sends Resume, and the
engine asks the fd socket for them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import secrets
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from google.protobuf.duration_pb2 import Duration
from torpor.v1 import agent_pb2

from torpord.backends.base import Slab
from torpord.core.events import EventType
from torpord.core.manager import ModelManager
from torpord.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TorporError,
    Unavailable,
    some,
)
from torpord.types import ModelState, Tier

__all__ = ["AgentRegistry", "Attachment", "Ended", "Outbox"]

log = structlog.get_logger("torpord.agents")


@dataclass(frozen=True)
class Ended:
    """Put in an attachment's outbox: end its Attach stream with this error."""

    error: TorporError


class Outbox:
    """What an Attach stream sends next, in order: Quiesce and Resume
    messages, or Ended."""

    def __init__(self) -> None:
        self._items: collections.deque[agent_pb2.AttachResponse | Ended] = collections.deque()
        self._ready = asyncio.Event()

    def put(self, item: agent_pb2.AttachResponse | Ended) -> None:
        self._items.append(item)
        self._ready.set()

    async def get(self) -> agent_pb2.AttachResponse | Ended:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, agent_pb2.AttachResponse) and item.HasField("resume"):
            return self._coalesce(item)
        return item

    def _coalesce(self, first: agent_pb2.AttachResponse) -> agent_pb2.AttachResponse:
        # One Resume for the Resumes already waiting behind it (the engine then
        # asks for their fds at once), as long as nothing else comes between.
        layers = list(first.resume.layers)
        sequence = first.resume.sequence
        while self._items:
            nxt = self._items[0]
            if isinstance(nxt, Ended) or not nxt.HasField("resume"):
                break
            self._items.popleft()
            layers.extend(nxt.resume.layers)
            sequence = nxt.resume.sequence
        if sequence == first.resume.sequence:
            return first
        return agent_pb2.AttachResponse(
            resume=agent_pb2.Resume(
                sequence=sequence, layers=layers, layout_hash=first.resume.layout_hash
            )
        )


@dataclass(eq=False)
class Attachment:
    id: str
    pid: int
    model_id: str
    engine: str
    rank: int
    layout_hash: str
    slab_kind: str  # "memfd" or "cuda"
    device_index: int
    device: str  # the device's UUID
    outbox: Outbox = field(default_factory=Outbox)
    # Quiesce sequence numbers waiting for their QuiesceAck: True when it came,
    # False when the stream ended first.
    acks: dict[int, asyncio.Future[bool]] = field(default_factory=dict)
    # The layers each unanswered Quiesce asked for (empty: every layer).
    quiescing: dict[int, list[str]] = field(default_factory=dict)
    sequence: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # The slabs the engine was sent and hasn't let go of, by layer name.
    mapped: dict[str, Slab] = field(default_factory=dict)
    # The engine's process, opened when it first took fds (its pid is then the
    # socket peer's, not just what Hello said); None before that.
    pidfd: int | None = None
    released: bool = False  # it said Release: it maps nothing, and takes nothing more

    def describe(self) -> str:
        who = f"engine {self.engine!r}" if self.engine else "engine"
        return f"{who} (pid {self.pid}, rank {self.rank})"


class AgentRegistry:
    """Who is attached to what, and the sleep protocol with them (see
    torpord.core.engines). Lives on the event loop."""

    def __init__(
        self,
        manager: ModelManager,
        fd_socket: Path,
        *,
        quiesce_timeout: float = 10.0,
        on_quiesce_timeout: str = "detach",
    ) -> None:
        self.manager = manager
        self.fd_socket = fd_socket
        self.quiesce_timeout = quiesce_timeout
        self.on_quiesce_timeout = on_quiesce_timeout
        self._attachments: dict[str, Attachment] = {}
        # Processes of engines gone while still mapping slabs: pidfd -> pid;
        # and those attachments: id -> pid (their late Release frees them).
        self._watched: dict[int, int] = {}
        self._holding: dict[str, int] = {}
        self._closing = False
        manager.engines = self

    def _of(self, model_id: str) -> list[Attachment]:
        return [a for a in self._attachments.values() if a.model_id == model_id]

    def _count_changed(self, model_id: str) -> None:
        model = self.manager.find(model_id)
        if model is not None:
            model.engines = len(self._of(model_id))
            self.manager.bus.publish(EventType.CHANGED, model.snapshot())

    # -- the Engines protocol ----------------------------------------------------

    def attached(self, model_id: str) -> int:
        return len(self._of(model_id))

    async def quiesce(
        self, model_id: str, layers: Sequence[str], within: float | None = None
    ) -> list[str]:
        """(`within`: a shorter deadline than agents.quiesce_timeout, at shutdown.)"""
        loop = asyncio.get_running_loop()
        waiting: dict[asyncio.Future[bool], Attachment] = {}
        limit = self.quiesce_timeout if within is None else min(within, self.quiesce_timeout)
        timeout = Duration()
        timeout.FromNanoseconds(int(limit * 1e9))
        for attachment in self._of(model_id):
            sequence = next(attachment.sequence)
            ack: asyncio.Future[bool] = loop.create_future()
            attachment.acks[sequence] = ack
            attachment.quiescing[sequence] = list(layers)
            waiting[ack] = attachment
            attachment.outbox.put(
                agent_pb2.AttachResponse(
                    quiesce=agent_pb2.Quiesce(
                        sequence=sequence, layers=list(layers), timeout=timeout
                    )
                )
            )
        if not waiting:
            return []
        answered, late = await asyncio.wait(waiting, timeout=limit)
        setting = "agents.quiesce_timeout" if within is None else "the daemon is shutting down"
        notes = []
        for ack in answered:
            if not ack.result():  # the stream ended before the engine answered
                attachment = waiting[ack]
                note = f"{attachment.describe()} went away before letting go of the weights"
                log.warning("engine gone mid-quiesce", model_id=model_id, pid=attachment.pid)
                notes.append(note)
        for ack in late:
            attachment = waiting[ack]
            note = (
                f"{attachment.describe()} did not let go of the weights within {limit:g}s; detached"
            ) + self._unresponsive(attachment)
            log.warning("engine revoked", model_id=model_id, pid=attachment.pid, note=note)
            self.revoke(
                attachment.id,
                Aborted(
                    f"the {attachment.describe()} did not acknowledge Quiesce within"
                    f" {limit:g}s ({setting}); its attachment was revoked",
                    reason="QUIESCE_TIMEOUT",
                ),
            )
            notes.append(note)
        return notes

    def resume(self, model_id: str, layers: Sequence[str]) -> None:
        for attachment in self._of(model_id):
            attachment.outbox.put(
                agent_pb2.AttachResponse(
                    resume=agent_pb2.Resume(
                        sequence=next(attachment.sequence),
                        layers=list(layers),
                        layout_hash=attachment.layout_hash,
                    )
                )
            )

    def unloaded(self, model_id: str) -> None:
        for attachment in self._of(model_id):
            self.revoke(
                attachment.id,
                NotFound(f"model {model_id!r} was unloaded", reason="MODEL_UNLOADED"),
            )

    async def shutdown(self, timeout: float | None = None) -> None:
        """The daemon is stopping: every engine lets go of every layer (within
        the quiesce timeout, or `timeout` if sooner), then every attachment ends."""
        models = {a.model_id for a in self._attachments.values()}
        await asyncio.gather(*(self.quiesce(model_id, [], timeout) for model_id in models))
        for attachment_id in list(self._attachments):
            self.revoke(
                attachment_id, Unavailable("the daemon is shutting down", reason="SHUTTING_DOWN")
            )
        loop = asyncio.get_running_loop()
        self._closing = True
        for pidfd in list(self._watched):
            del self._watched[pidfd]
            loop.remove_reader(pidfd)
            os.close(pidfd)

    # -- attachments ----------------------------------------------------------------

    def attach(self, hello: agent_pb2.Hello) -> Attachment:
        if hello.pid <= 0:
            raise InvalidArgument("hello.pid must be the engine's process id", reason="INVALID_PID")
        snapshot = self.manager.get(hello.model_id)
        if snapshot.state not in (ModelState.ACTIVE, ModelState.OFFLOADED):
            raise FailedPrecondition(
                f"model {hello.model_id!r} is {snapshot.state.value.lower()}; engines attach"
                " to an active (or partly offloaded) model: wake it first",
                reason="MODEL_NOT_ACTIVE",
                metadata={"model_id": hello.model_id, "state": snapshot.state.value},
            )
        attachment = Attachment(
            secrets.token_hex(16),
            hello.pid,
            hello.model_id,
            hello.engine,
            hello.rank,
            snapshot.layout_hash,
            "cuda" if self.manager.backend.kind == "cuda" else "memfd",
            next(
                (d.index for d in self.manager.backend.devices() if d.uuid == snapshot.device),
                0,
            ),
            snapshot.device or "",
        )
        self._attachments[attachment.id] = attachment
        self._count_changed(hello.model_id)
        log.info("engine attached", model_id=hello.model_id, pid=hello.pid, engine=hello.engine)
        return attachment

    def acknowledged(self, attachment: Attachment, sequence: int) -> None:
        layers = attachment.quiescing.pop(sequence, None)
        if layers is not None:  # the engine let go of them
            if layers:
                for name in layers:
                    attachment.mapped.pop(name, None)
            else:
                attachment.mapped.clear()
        ack = attachment.acks.pop(sequence, None)
        if ack is not None and not ack.done():
            ack.set_result(True)

    def released(self, attachment: Attachment) -> None:
        """The engine unmapped everything and is detaching."""
        attachment.released = True
        attachment.mapped.clear()
        log.info("engine let go of every slab", model_id=attachment.model_id, pid=attachment.pid)

    def _hold(self, attachment: Attachment) -> int:
        """Where freeing can't take memory back from a process (CUDA), keep
        what the engine still maps counted until it lets go late or its
        process exits; returns the bytes."""
        backend = self.manager.backend
        held = [slab for slab in attachment.mapped.values() if not slab.freed]
        pidfd = attachment.pidfd
        if not held or backend.revocation_frees or pidfd is None:
            return 0
        for slab in held:
            backend.held_by(slab, attachment.pid, attachment.id)
        attachment.mapped.clear()
        self._holding[attachment.id] = attachment.pid
        attachment.pidfd = None  # the watch owns it now
        self._watch(pidfd, attachment.pid)
        return sum(slab.size for slab in held)

    async def late_release(self, attachment_id: str, peer_pid: int) -> bool:
        """An engine whose stream ended before it could say Release has since
        unmapped everything (it says so on the fd socket): what was held for
        it is free. False if nothing was held for that attachment."""
        attachment = self._attachments.get(attachment_id)
        pid = attachment.pid if attachment is not None else self._holding.get(attachment_id)
        if pid is None:
            log.info("engine let go after its stream ended; nothing held", pid=peer_pid)
            return False
        if pid != peer_pid:
            raise PermissionDenied(
                f"attachment belongs to pid {pid}, asked by pid {peer_pid}",
                reason="PID_MISMATCH",
                metadata={"attached_pid": pid, "peer_pid": peer_pid},
            )
        if attachment is not None:  # (its stream has not ended here yet)
            self.released(attachment)
            return True
        del self._holding[attachment_id]
        freed = self.manager.backend.let_go(pid, attachment_id)
        log.info("engine let go after its stream ended", pid=pid, freed_bytes=freed)
        return True

    def _unresponsive(self, attachment: Attachment) -> str:
        """An engine that didn't let go in time: kill it if so configured, and
        keep what it still maps counted as used while its process lives where
        freeing can't take it back (CUDA). Returns the words for the note."""
        said = ""
        pidfd = attachment.pidfd
        if pidfd is None:  # it never took an fd: nothing mapped, and its pid unproven
            return said
        if self.on_quiesce_timeout == "kill":
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                said = " and killed (agents.on_quiesce_timeout)"
                log.warning("engine killed", model_id=attachment.model_id, pid=attachment.pid)
            except ProcessLookupError:
                pass  # gone already
            except OSError as err:
                said = f"; it could not be killed ({err.strerror})"
        size = self._hold(attachment)
        if size and not said.startswith(" and killed"):
            said += f"; the {size} bytes it still maps stay in use until its process exits"
        return said

    def _watch(self, pidfd: int, pid: int) -> None:
        """When the process exits, the backend gives back what it held."""
        if self._closing:  # (the daemon is stopping: nothing to give back to)
            os.close(pidfd)
            return
        self._watched[pidfd] = pid
        asyncio.get_running_loop().add_reader(pidfd, self._exited, pidfd)

    def _exited(self, pidfd: int) -> None:
        pid = self._watched.pop(pidfd)
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        freed = self.manager.backend.exited(pid)
        for attachment_id in [a for a, p in self._holding.items() if p == pid]:
            del self._holding[attachment_id]
        log.info("engine process exited: what it held is free", pid=pid, freed_bytes=freed)

    def detach(self, attachment_id: str) -> None:
        """The engine is gone (its stream ended): nothing of it waits any more.
        Its mappings went with it, or were revoked."""
        attachment = self._attachments.pop(attachment_id, None)
        if attachment is None:
            return
        for ack in attachment.acks.values():
            if not ack.done():
                ack.set_result(False)
        attachment.acks.clear()
        attachment.quiescing.clear()
        if self._hold(attachment):  # gone without saying it let go (see Release)
            log.info("engine detached still mapping slabs", pid=attachment.pid)
        if attachment.pidfd is not None:
            os.close(attachment.pidfd)
            attachment.pidfd = None
        self._count_changed(attachment.model_id)
        log.info("engine detached", model_id=attachment.model_id, pid=attachment.pid)

    def revoke(self, attachment_id: str, error: TorporError) -> None:
        """Detach an engine and end its stream with `error`. It gets no more
        fds; the slabs it still maps are truncated by the backend when freed,
        so a stray access faults rather than reading stale bytes."""
        attachment = self._attachments.get(attachment_id)
        if attachment is None:
            return
        self.detach(attachment_id)
        attachment.outbox.put(Ended(error))

    async def export(
        self,
        attachment_id: str,
        peer_pid: int,
        names: list[str],
        model_id: str = "",
        peer_pidfd: int | None = None,
    ) -> tuple[dict[str, Any], list[int]]:
        """The header and fresh fds of the asked layers that are on the device
        (every such layer if none is named), for the process that attached and
        no other. Asked layers not on the device are listed as absent.
        `peer_pidfd` (the asking process, taken from its socket; closed here)
        becomes the attachment's if it has none yet."""
        pidfd = peer_pidfd
        try:
            header, fds, attachment = self._export(attachment_id, peer_pid, names, model_id)
            if header["layers"] and attachment.pidfd is None:
                # The asking process, held by a pidfd (from its socket where the
                # kernel gives one), so a later kill or exit watch can't hit a
                # reused pid. Without one: no kill, no watch, nothing held.
                if pidfd is None:
                    with contextlib.suppress(OSError):
                        pidfd = os.pidfd_open(peer_pid)
                attachment.pidfd, pidfd = pidfd, None
            return header, fds
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _export(
        self, attachment_id: str, peer_pid: int, names: list[str], model_id: str
    ) -> tuple[dict[str, Any], list[int], Attachment]:
        attachment = self._attachments.get(attachment_id)
        if attachment is None:
            raise PermissionDenied("unknown attachment", reason="UNKNOWN_ATTACHMENT")
        if attachment.pid != peer_pid:
            raise PermissionDenied(
                f"attachment belongs to pid {attachment.pid}, asked by pid {peer_pid}",
                reason="PID_MISMATCH",
                metadata={"attached_pid": attachment.pid, "peer_pid": peer_pid},
            )
        if model_id and model_id != attachment.model_id:
            raise PermissionDenied(
                f"the attachment is to model {attachment.model_id!r}, not {model_id!r}",
                reason="MODEL_MISMATCH",
                metadata={"attached_model": attachment.model_id, "model_id": model_id},
            )
        if attachment.released:
            raise FailedPrecondition(
                "this attachment was released by its engine", reason="ATTACHMENT_RELEASED"
            )
        model = self.manager.find(attachment.model_id)
        if model is None:
            raise FailedPrecondition(
                f"model {attachment.model_id!r} is gone", reason="MODEL_NOT_FOUND"
            )
        asked = [layer for layer in model.layers if not names or layer.plan.name in names]
        unknown = set(names) - {layer.plan.name for layer in asked}
        if unknown:
            raise InvalidArgument(f"unknown layers {some(sorted(unknown))}", reason="UNKNOWN_LAYER")
        layers = [layer for layer in asked if layer.tier is Tier.DEVICE]
        fds: list[int] = []
        try:
            for layer in layers:
                assert layer.slab is not None
                fds.append(self.manager.backend.export(layer.slab))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for layer in layers:
            assert layer.slab is not None
            attachment.mapped[layer.plan.name] = layer.slab
        header = {
            "model_id": model.model_id,
            "layout_hash": attachment.layout_hash,
            "layers": [{"name": layer.plan.name, "size": layer.plan.size} for layer in layers],
            "absent": [layer.plan.name for layer in asked if layer.tier is not Tier.DEVICE],
        }
        return header, fds, attachment
