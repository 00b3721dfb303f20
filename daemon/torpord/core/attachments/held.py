"""Memory an engine still maps after it was detached, where freeing can't
take it back from its process (CUDA; a sealed memfd): counted as used, held for that
process, until it lets go late or exits (watched by its pidfd)."""

from __future__ import annotations

import asyncio
import os
import signal

import structlog

from torpord.backends.base import Backend
from torpord.core.attachments.attachment import Attachment

__all__ = ["HeldMemory", "kill"]

log = structlog.get_logger("torpord.agents")


def kill(attachment: Attachment) -> str:
    """SIGKILL the attachment's process (by its pidfd, so never a reused
    pid); returns the words for the note."""
    assert attachment.pidfd is not None
    try:
        signal.pidfd_send_signal(attachment.pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return ""  # gone already
    except OSError as err:
        return f"; it could not be killed ({err.strerror})"
    log.warning("engine killed", model_id=attachment.model_id, pid=attachment.pid)
    return " and killed (agents.on_quiesce_timeout)"


class HeldMemory:
    """The slabs held for engine processes, and the watch on those processes.
    Lives on the event loop."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        # Processes of engines gone while still mapping slabs: pidfd -> pid;
        # and those attachments: id -> pid (their late Release frees them).
        self._watched: dict[int, int] = {}
        self._holding: dict[str, int] = {}
        self._closing = False

    def hold(self, attachment: Attachment) -> int:
        """Where freeing can't take memory back from a process (CUDA, a sealed
        memfd), keep what the engine still maps counted until it lets go late
        or its process exits; returns the bytes."""
        backend = self._backend
        held = [
            slab
            for slab in attachment.mapped.values()
            if not slab.freed and not backend.frees_on_revocation(slab)
        ]
        pidfd = attachment.pidfd
        if not held or pidfd is None:
            return 0
        for slab in held:
            backend.held_by(slab, attachment.pid, attachment.id)
        attachment.mapped.clear()
        self._holding[attachment.id] = attachment.pid
        attachment.pidfd = None  # the watch owns it now
        self._watch(pidfd, attachment.pid)
        return sum(slab.size for slab in held)

    def holder(self, attachment_id: str) -> int | None:
        """The pid whose memory is held for that (detached) attachment."""
        return self._holding.get(attachment_id)

    def let_go(self, attachment_id: str) -> int:
        """The engine of that attachment unmapped everything: free what was
        held for it; returns the bytes."""
        pid = self._holding.pop(attachment_id)
        return self._backend.let_go(pid, attachment_id)

    def close(self) -> None:
        """The daemon is stopping: stop watching (nothing to give back to)."""
        loop = asyncio.get_running_loop()
        self._closing = True
        for pidfd in list(self._watched):
            del self._watched[pidfd]
            loop.remove_reader(pidfd)
            os.close(pidfd)

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
        freed = self._backend.exited(pid)
        for attachment_id in [a for a, p in self._holding.items() if p == pid]:
            del self._holding[attachment_id]
        log.info("engine process exited: what it held is free", pid=pid, freed_bytes=freed)
