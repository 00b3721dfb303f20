"""Memory an engine still maps after it was revoked, on a backend where freeing
can't take it back (CUDA: an importing process keeps the memory alive until
it lets go or exits): the pools count it used, as held, until that process
exits, so the budget never promises memory the driver doesn't have.

The host backend can take memory back (it truncates freed slabs), so here it
is told not to (`revocation_frees = False`); everything else is real: the
registry, the manager, the slabs, and the engine processes with their pidfds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from torpor.testing import make_checkpoint
from torpord.backends.host import HostBackend
from torpord.core.attachments.attachment import Attachment
from torpord.core.attachments.messages import Hello, Quiesce
from torpord.core.attachments.registry import AgentRegistry
from torpord.core.manager import ManagerSettings, ModelManager
from torpord.errors import FailedPrecondition, PermissionDenied, ResourceExhausted
from torpord.storage import open_checkpoint, plan_layers
from torpord.types import ModelState

MiB = 2**20


class ImportedMemoryBackend(HostBackend):
    """The host backend, keeping a freed slab's memory for whoever maps it."""

    revocation_frees = False


class Setup:
    def __init__(self, tmp: Path, device_capacity: int) -> None:
        self.backend = ImportedMemoryBackend(
            devices=1, device_capacity=device_capacity, host_capacity=64 * MiB
        )
        self.manager = ModelManager(self.backend, ManagerSettings(allowed_roots=(tmp.resolve(),)))
        self.registry = AgentRegistry(self.manager, quiesce_timeout=0.3)
        self.manager.use_engines(self.registry)
        self.engines: list[subprocess.Popen[bytes]] = []

    def used(self) -> tuple[int, int]:
        pool = self.backend.devices()[0].pool
        return pool.used, pool.held

    def attached(self, model_id: str) -> tuple[Attachment, subprocess.Popen[bytes]]:
        """A real process, attached (by its own word: no fds taken yet)."""
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        self.engines.append(proc)
        return self.registry.attach(Hello(model_id=model_id, pid=proc.pid)), proc

    async def engine(self, model_id: str) -> tuple[Attachment, subprocess.Popen[bytes]]:
        """A real process that attached and took every slab's fd (as the agent
        does), and never answers a Quiesce."""
        attachment, proc = self.attached(model_id)
        _, fds = await self.registry.export(attachment.id, proc.pid, [])
        for fd in fds:
            os.close(fd)
        return attachment, proc


@contextlib.asynccontextmanager
async def started(tmp: Path, device_capacity: int = 8 * MiB) -> AsyncIterator[Setup]:
    s = Setup(tmp, device_capacity)
    try:
        yield s
    finally:
        for proc in s.engines:
            proc.kill()
            proc.wait()
        await s.registry.shutdown()
        await s.manager.close(1.0)
        s.backend.close()


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    async with started(tmp_path) as s:
        yield s


async def until(check: object, timeout: float = 30) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_a_revoked_engines_memory_stays_used_until_its_process_exits(
    tmp_path: Path,
) -> None:
    ckpt = make_checkpoint(tmp_path / "m", layers=4, hidden=256)
    # A device with room for the model and half again: waking needs the
    # model's memory a second time while a dead engine's copy is held.
    planned = sum(plan.size for plan in plan_layers(open_checkpoint(str(ckpt))))
    async with started(tmp_path, device_capacity=planned + planned // 2) as setup:
        model = await setup.manager.load("m", str(ckpt))
        size = sum(layer.plan.size for layer in model.layers)
        assert size == planned
        assert setup.used() == (size, 0)
        _, proc = await setup.engine("m")

        model = await setup.manager.sleep("m", 1)
        assert model.state is ModelState.ASLEEP
        note = model.last_transition.note if model.last_transition else ""
        assert f"pid {proc.pid}" in note
        assert f"the {size} bytes it still maps stay in use until its process exits" in note
        assert setup.used() == (size, size)  # freed by the daemon, not by the engine
        # Waking needs that memory again: refused while the engine lives, saying why.
        with pytest.raises(ResourceExhausted) as err:
            await setup.manager.wake("m")
        assert "held by engines that went away still mapping them" in err.value.message
        assert err.value.metadata["held"] == str(size)
        assert setup.manager.get("m").state is ModelState.ASLEEP

        proc.kill()
        assert await until(lambda: setup.used() == (0, 0))
        assert (await setup.manager.wake("m")).state is ModelState.ACTIVE


async def test_only_what_a_revoked_engine_still_maps_is_held(setup: Setup, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "m", layers=4, hidden=256)
    model = await setup.manager.load("m", str(ckpt))
    sizes = {layer.plan.name: layer.plan.size for layer in model.layers}
    offloaded = list(sizes)[1:3]
    engine, proc = await setup.engine("m")

    async def answer_once() -> None:  # lets go of what the first Quiesce asks, then hangs
        while True:
            item = await engine.outbox.get()
            if isinstance(item, Quiesce):
                setup.registry.acknowledged(engine, item.sequence)
                return

    answering = asyncio.create_task(answer_once())
    await setup.manager.offload("m", offloaded)
    await answering
    assert setup.used() == (sum(sizes.values()) - sum(sizes[n] for n in offloaded), 0)
    model = await setup.manager.sleep("m", 1)  # now it hangs: revoked
    still_mapped = sum(size for name, size in sizes.items() if name not in offloaded)
    assert setup.used() == (still_mapped, still_mapped)
    assert model.last_transition is not None
    assert f"the {still_mapped} bytes it still maps" in model.last_transition.note
    proc.kill()
    assert await until(lambda: setup.used() == (0, 0))


async def test_an_engine_that_never_took_an_fd_holds_nothing(setup: Setup, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "m", layers=2, hidden=256)
    await setup.manager.load("m", str(ckpt))
    setup.attached("m")  # a claim, unproven
    model = await setup.manager.sleep("m", 1)
    assert model.last_transition is not None
    assert "detached" in model.last_transition.note
    assert "still maps" not in model.last_transition.note
    assert setup.used() == (0, 0)


@pytest.mark.parametrize("said_so", [True, False])
async def test_an_engine_that_detaches_holds_what_it_did_not_say_it_let_go(
    setup: Setup, tmp_path: Path, said_so: bool
) -> None:
    """Its stream ended (the agent closed, or its listener failed) while the
    process lives on: without a Release, what it was sent may still be mapped."""
    ckpt = make_checkpoint(tmp_path / "m", layers=2, hidden=256)
    model = await setup.manager.load("m", str(ckpt))
    size = sum(layer.plan.size for layer in model.layers)
    attachment, proc = await setup.engine("m")
    if said_so:
        setup.registry.released(attachment)
    setup.registry.detach(attachment.id)  # (the stream ended)
    await setup.manager.sleep("m", 1)
    assert setup.used() == ((0, 0) if said_so else (size, size))
    proc.kill()
    assert await until(lambda: setup.used() == (0, 0))


async def test_a_late_release_frees_what_was_held_and_only_for_its_process(
    setup: Setup, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "m", layers=2, hidden=256)
    model = await setup.manager.load("m", str(ckpt))
    size = sum(layer.plan.size for layer in model.layers)
    attachment, proc = await setup.engine("m")
    setup.registry.detach(attachment.id)  # gone without a Release
    await setup.manager.sleep("m", 1)
    assert setup.used() == (size, size)
    with pytest.raises(PermissionDenied) as err:  # another process can't let go for it
        await setup.registry.late_release(attachment.id, os.getpid())
    assert err.value.reason == "PID_MISMATCH" and setup.used() == (size, size)
    assert await setup.registry.late_release(attachment.id, proc.pid)  # it unmapped, and says so
    assert setup.used() == (0, 0) and proc.poll() is None
    assert not await setup.registry.late_release(attachment.id, proc.pid)  # (said twice)


async def test_after_release_an_attachment_takes_nothing_more(setup: Setup, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "m", layers=2, hidden=256)
    await setup.manager.load("m", str(ckpt))
    attachment, proc = await setup.engine("m")
    setup.registry.released(attachment)
    with pytest.raises(FailedPrecondition) as err:
        await setup.registry.export(attachment.id, proc.pid, [])
    assert err.value.reason == "ATTACHMENT_RELEASED"
    setup.registry.detach(attachment.id)
    await setup.manager.sleep("m", 1)
    assert setup.used() == (0, 0)


async def test_without_a_pidfd_an_export_still_works_and_leaks_nothing(
    setup: Setup, tmp_path: Path
) -> None:
    """No pidfd to be had for the asking process (here: it exited and was
    reaped before the daemon could open one, as when an engine dies between
    its request and the answer; a kernel out of fds, or without pidfds,
    fails the same way)."""
    ckpt = make_checkpoint(tmp_path / "m", layers=2, hidden=256)
    await setup.manager.load("m", str(ckpt))
    attachment, proc = setup.attached("m")
    proc.kill()
    proc.wait()
    with pytest.raises(ProcessLookupError):  # (what the export meets)
        os.pidfd_open(proc.pid)
    before = len(os.listdir("/proc/self/fd"))
    _, fds = await setup.registry.export(attachment.id, proc.pid, [])
    assert fds and attachment.pidfd is None  # no kill, no watch: but the engine has its fds
    for fd in fds:
        os.close(fd)
    assert len(os.listdir("/proc/self/fd")) == before
