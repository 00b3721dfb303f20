"""The registry of engines attached to models, and the sleep protocol with
them: the core's `Engines` (torpord.core.engines).

An engine attaches (the server's Attach stream, saying which pid it is) and
gets an attachment id; it then asks the fd socket for the slabs with that
id, and only the process that attached gets them. Before the manager moves
or frees device slabs it asks each attached engine to quiesce (a Quiesce in
its outbox, answered by an acknowledgement once it has unmapped), detaching
the ones that don't answer in time; as layers land on the device it sends
Resume, and the engine asks the fd socket for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Sequence
from typing import Any

import structlog

from torpord.core.attachments.attachment import Attachment
from torpord.core.attachments.export import export_slabs
from torpord.core.attachments.held import HeldMemory, kill
from torpord.core.attachments.host import EngineHost
from torpord.core.attachments.messages import Ended, Hello, Published, Quiesce, Resume
from torpord.core.events import EventType
from torpord.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TorporError,
    Unavailable,
)
from torpord.types import ModelState

__all__ = ["AgentRegistry"]

log = structlog.get_logger("torpord.agents")


class AgentRegistry:
    """Who is attached to what, and the sleep protocol with them (see
    torpord.core.engines). Lives on the event loop."""

    def __init__(
        self,
        host: EngineHost,
        *,
        quiesce_timeout: float = 10.0,
        on_quiesce_timeout: str = "detach",
    ) -> None:
        self._host = host
        self.quiesce_timeout = quiesce_timeout
        self.on_quiesce_timeout = on_quiesce_timeout
        self._attachments: dict[str, Attachment] = {}
        self._held = HeldMemory(host.backend)

    def _of(self, model_id: str) -> list[Attachment]:
        return [a for a in self._attachments.values() if a.model_id == model_id]

    def _count_changed(self, model_id: str) -> None:
        model = self._host.find(model_id)
        if model is not None:
            model.engines = len(self._of(model_id))
            self._host.bus.publish(EventType.CHANGED, model.snapshot())

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
        for attachment in self._of(model_id):
            sequence = next(attachment.sequence)
            ack: asyncio.Future[bool] = loop.create_future()
            attachment.acks[sequence] = ack
            attachment.quiescing[sequence] = list(layers)
            waiting[ack] = attachment
            attachment.outbox.put(Quiesce(sequence=sequence, layers=tuple(layers), timeout=limit))
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
            self._host.counters.quiesce_timed_out(model_id)
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
                Resume(
                    sequence=next(attachment.sequence),
                    layers=tuple(layers),
                    layout_hash=attachment.layout_hash,
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
        self._held.close()

    # -- attachments ----------------------------------------------------------------

    def attach(self, hello: Hello) -> Attachment:
        if hello.pid <= 0:
            raise InvalidArgument("hello.pid must be the engine's process id", reason="INVALID_PID")
        snapshot = self._host.get(hello.model_id)
        if snapshot.state not in (ModelState.ACTIVE, ModelState.OFFLOADED):
            raise FailedPrecondition(
                f"model {hello.model_id!r} is {snapshot.state.value.lower()}; engines attach"
                " to an active (or partly offloaded) model: wake it first",
                reason="MODEL_NOT_ACTIVE",
                metadata={"model_id": hello.model_id, "state": snapshot.state.value},
            )
        attachment = self._new(secrets.token_hex(16), hello, snapshot.layout_hash, snapshot.device)
        self._attachments[attachment.id] = attachment
        self._host.counters.attached(hello.model_id)
        self._count_changed(hello.model_id)
        log.info("engine attached", model_id=hello.model_id, pid=hello.pid, engine=hello.engine)
        return attachment

    async def publish(self, hello: Hello) -> Attachment:
        """Attach the engine as the writer of a new model, an image (see
        torpord.core.images): created PUBLISHING, its slabs writable by this
        attachment alone until `commit`; removed if the engine goes first."""
        assert hello.publish is not None
        if hello.pid <= 0:
            raise InvalidArgument("hello.pid must be the engine's process id", reason="INVALID_PID")
        attachment_id = secrets.token_hex(16)
        model = await self._host.images.begin(
            hello.model_id,
            hello.publish.fingerprint,
            hello.publish.groups,
            device=hello.publish.device,
            publisher=attachment_id,
        )
        attachment = self._new(attachment_id, hello, model.layout_hash, model.device)
        attachment.writer = True
        self._attachments[attachment.id] = attachment
        self._host.counters.attached(hello.model_id)
        self._count_changed(hello.model_id)
        log.info("engine publishing", model_id=hello.model_id, pid=hello.pid, engine=hello.engine)
        return attachment

    def commit(self, attachment: Attachment) -> None:
        """The writer has written and unmapped every slab: seal them (on a task
        of its own, so the stream keeps being read). Published goes to the
        engine when done; a failure ends its stream, and the model goes."""
        if not attachment.writer or attachment.committing is not None:
            self.revoke(
                attachment.id,
                FailedPrecondition(
                    f"this engine is not publishing model {attachment.model_id!r}"
                    " (or already committed it)",
                    reason="NOT_PUBLISHING",
                    metadata={"model_id": attachment.model_id},
                ),
            )
            return
        # Its word, as a quiesce acknowledgement's: it maps none of them now
        # (a writable mapping left would fail the seal).
        attachment.mapped.clear()
        attachment.committing = asyncio.create_task(
            self._commit(attachment), name=f"commit {attachment.model_id}"
        )

    async def _commit(self, attachment: Attachment) -> None:
        try:
            snapshot = await self._host.images.commit(attachment.model_id, attachment.id)
        except TorporError as err:
            self.revoke(attachment.id, err)
            return
        attachment.outbox.put(Published(snapshot.layout_hash))
        log.info("image published", model_id=attachment.model_id, pid=attachment.pid)

    def _new(self, attachment_id: str, hello: Hello, layout_hash: str, device: str) -> Attachment:
        backend = self._host.backend
        return Attachment(
            attachment_id,
            hello.pid,
            hello.model_id,
            hello.engine,
            hello.rank,
            layout_hash,
            "cuda" if backend.kind == "cuda" else "memfd",
            next((d.index for d in backend.devices() if d.uuid == device), 0),
            device or "",
        )

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

    def activity(self, attachment: Attachment, uses: int, busy_seconds: float, in_use: int) -> None:
        """The engine's use() blocks since its last report (coalesced by its
        agent). A report no agent could make is logged and dropped: a
        miscount never ends an engine's attachment."""
        if self._attachments.get(attachment.id) is not attachment:
            return  # detached already: its open uses were forgotten, and stay so
        try:
            self._host.report_activity(
                attachment.model_id, attachment.id, uses, busy_seconds, in_use
            )
        except NotFound:
            return  # (being unloaded: the attachment ends next)
        except InvalidArgument as err:
            if not attachment.misreported:  # (once: a broken agent would repeat it)
                attachment.misreported = True
                log.warning(
                    "engine's activity report dropped",
                    model_id=attachment.model_id,
                    pid=attachment.pid,
                    error=err.message,
                )
            return
        log.debug(
            "activity reported",
            model_id=attachment.model_id,
            pid=attachment.pid,
            uses=uses,
            in_use=in_use,
        )

    def released(self, attachment: Attachment) -> None:
        """The engine unmapped everything and is detaching."""
        attachment.released = True
        attachment.mapped.clear()
        log.info("engine let go of every slab", model_id=attachment.model_id, pid=attachment.pid)

    async def late_release(self, attachment_id: str, peer_pid: int) -> bool:
        """An engine whose stream ended before it could say Release has since
        unmapped everything (it says so on the fd socket): what was held for
        it is free. False if nothing was held for that attachment."""
        attachment = self._attachments.get(attachment_id)
        pid = attachment.pid if attachment is not None else self._held.holder(attachment_id)
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
        freed = self._held.let_go(attachment_id)
        log.info("engine let go after its stream ended", pid=pid, freed_bytes=freed)
        return True

    def _unresponsive(self, attachment: Attachment) -> str:
        """An engine that didn't let go in time: kill it if so configured, and
        keep what it still maps counted as used while its process lives where
        freeing can't take it back (CUDA). Returns the words for the note."""
        if attachment.pidfd is None:  # it never took an fd: nothing mapped, and its pid unproven
            return ""
        said = kill(attachment) if self.on_quiesce_timeout == "kill" else ""
        size = self._held.hold(attachment)
        if size and not said.startswith(" and killed"):
            said += f"; the {size} bytes it still maps stay in use until its process exits"
        return said

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
        if self._held.hold(attachment):  # gone without saying it let go (see Release)
            log.info("engine detached still mapping slabs", pid=attachment.pid)
        if attachment.pidfd is not None:
            os.close(attachment.pidfd)
            attachment.pidfd = None
        if attachment.writer:  # (nothing, once committed)
            self._host.images.abandon(attachment.model_id, attachment.id)
        self._host.forget_reporter(attachment.model_id, attachment.id)  # its uses end
        self._host.counters.detached(attachment.model_id)
        self._count_changed(attachment.model_id)
        log.info("engine detached", model_id=attachment.model_id, pid=attachment.pid)

    def revoke(self, attachment_id: str, error: TorporError) -> None:
        """Detach an engine and end its stream with `error`. It gets no more
        fds; the slabs it still maps are truncated by the backend when freed,
        so a stray access faults rather than reading stale bytes."""
        attachment = self._attachments.get(attachment_id)
        if attachment is None:
            return
        if error.reason not in ("MODEL_UNLOADED", "SHUTTING_DOWN"):  # (as asked: not lost)
            self._host.counters.revoked(attachment.model_id)
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
            attachment = self._attachments.get(attachment_id)
            if attachment is None:
                raise PermissionDenied("unknown attachment", reason="UNKNOWN_ATTACHMENT")
            header, fds = export_slabs(self._host, attachment, peer_pid, names, model_id)
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
