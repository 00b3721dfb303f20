"""An image's memory that an engine process still maps after the daemon let
go of it is counted, as held, until that process exits (host backend).

An image's memfds are sealed against shrinking (from the writable export
on), so a free cannot truncate them: their pages live as long as any
process maps them. An engine revoked while mapping them (it never answered
a Quiesce), or a publisher whose stream ended without saying it let go,
keeps those pages; the pools must say so rather than promise them again.
Real processes, real fds and mappings, the real registry and manager.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from torpord.core.attachments.attachment import Attachment
from torpord.core.attachments.messages import Hello, Publish, Published
from torpord.core.attachments.registry import AgentRegistry
from torpord.storage.catalogue import CatalogueGroup, CatalogueTensor
from torpord.types import ModelState

from .harness import Harness

GROUP = 64 * 1024
GROUPS = tuple(
    CatalogueGroup(f"g{i}", GROUP, (CatalogueTensor(f"t{i}", "U8", (GROUP,), 0),)) for i in range(3)
)
IMAGE = GROUP * len(GROUPS)

# Maps every fd it is sent, read-only, says so, and sleeps.
ENGINE = """
import mmap, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
msg, fds, _, _ = socket.recv_fds(sock, 4096, 64)
sizes = [int(n) for n in msg.decode().split(",")]
kept = [mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ) for fd, n in zip(fds, sizes)]
sock.sendall(b"mapped")
time.sleep(600)
"""


class Engine:
    """A real process that maps the fds it is given."""

    def __init__(self) -> None:
        self._ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ENGINE, str(theirs.fileno())], pass_fds=[theirs.fileno()]
        )
        theirs.close()

    def map(self, header: dict[str, object], fds: list[int]) -> None:
        layers = header["layers"]
        assert isinstance(layers, list)
        sizes = ",".join(str(layer["size"]) for layer in layers)
        socket.send_fds(self._ours, [sizes.encode()], fds)
        for fd in fds:
            os.close(fd)
        assert self._ours.recv(16) == b"mapped"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._ours.close()


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.h = Harness(tmp)
        self.m = self.h.manager
        self.agents = AgentRegistry(self.m, quiesce_timeout=0.2)
        self.m.use_engines(self.agents)
        self.engines: list[Engine] = []

    def engine(self) -> Engine:
        engine = Engine()
        self.engines.append(engine)
        return engine

    def pool(self) -> tuple[int, int]:
        info = self.h.backend.devices()[0].pool
        return info.used, info.held

    async def published(self) -> None:
        """Image "img", written and committed by this process."""
        pid = os.getpid()
        writer = await self.agents.publish(
            Hello(model_id="img", pid=pid, publish=Publish("fp", GROUPS, self.device()))
        )
        header, fds = await self.agents.export(writer.id, pid, [])
        for layer, fd in zip(header["layers"], fds, strict=True):
            with mmap.mmap(fd, layer["size"]) as mm:
                mm[:] = b"\x07" * layer["size"]
            os.close(fd)
        self.agents.commit(writer)
        assert isinstance(await asyncio.wait_for(writer.outbox.get(), 30), Published)
        self.agents.released(writer)
        self.agents.detach(writer.id)

    def device(self) -> str:
        return self.h.backend.devices()[0].uuid


@pytest.fixture
async def s(tmp_path: Path) -> AsyncIterator[Setup]:
    setup = Setup(tmp_path)
    yield setup
    for engine in setup.engines:
        engine.kill()
    await setup.agents.shutdown(1.0)
    await setup.h.close()


async def until(check: Callable[[], bool]) -> bool:
    for _ in range(3000):
        if check():
            return True
        await asyncio.sleep(0.01)
    return False


async def test_an_engine_revoked_mapping_an_image_holds_it_until_it_exits(s: Setup) -> None:
    await s.published()
    engine = s.engine()
    attachment: Attachment = s.agents.attach(Hello(model_id="img", pid=engine.proc.pid))
    engine.map(*await s.agents.export(attachment.id, engine.proc.pid, []))
    assert s.pool() == (IMAGE, 0)

    asleep = await s.m.sleep("img", 1)  # (it never answers the Quiesce: revoked)
    assert asleep.state is ModelState.ASLEEP
    note = asleep.last_transition.note if asleep.last_transition else ""
    assert f"the {IMAGE} bytes it still maps stay in use until its process exits" in note
    # Freed by the daemon, but its pages live in the engine's mappings.
    assert s.pool() == (IMAGE, IMAGE)

    engine.kill()
    assert await until(lambda: s.pool() == (0, 0))


async def test_a_publisher_gone_mapping_its_slabs_holds_them_until_it_exits(s: Setup) -> None:
    engine = s.engine()
    pid = engine.proc.pid
    writer = await s.agents.publish(
        Hello(model_id="img", pid=pid, publish=Publish("fp", GROUPS, s.device()))
    )
    engine.map(*await s.agents.export(writer.id, pid, []))
    s.agents.detach(writer.id)  # (its stream ended; it never said it let go)
    assert "img" not in s.m.registry.models
    await asyncio.gather(*s.m.images.freeing)  # (an abandoned image's free, on a worker)
    assert s.pool() == (IMAGE, IMAGE)  # the image is gone, its pages are not

    engine.kill()
    assert await until(lambda: s.pool() == (0, 0))
