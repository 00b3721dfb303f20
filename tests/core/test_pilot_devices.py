"""Making room on one GPU holds up no other: each pool has its own turn."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from torpor.testing import make_checkpoint
from torpord.types import Cause, ModelState

from .harness import Harness, MiB
from .pilotkit import model_bytes
from .test_engines import Recorder


class GatedSome(Recorder):
    """Engines on `held` models that don't let go until the gate opens."""

    def __init__(self, h: Harness, held: set[str]) -> None:
        super().__init__(h)
        self.held = held
        self.quiescing = asyncio.Event()
        self.gate = asyncio.Event()

    async def quiesce(self, model_id: str, layers: Sequence[str]) -> list[str]:
        if model_id in self.held:
            self.quiescing.set()
            await self.gate.wait()
        return await super().quiesce(model_id, layers)


async def test_an_eviction_waiting_on_one_gpu_holds_up_no_other(tmp_path: Path) -> None:
    paths = {
        name: make_checkpoint(tmp_path / name, layers=4, hidden=64, seed=i)
        for i, name in enumerate("abcdef")
    }
    size = model_bytes(tmp_path, paths["a"])
    h = Harness(tmp_path, devices=2, device_capacity=size * 5 // 2, host_capacity=64 * MiB)
    m = h.manager
    try:
        gpu0, gpu1 = (d.uuid for d in h.backend.devices())
        for name, gpu in zip("abcd", (gpu0, gpu0, gpu1, gpu1), strict=True):
            await m.load(name, str(paths[name]), device=gpu)
        engines = GatedSome(h, {"a", "b"})  # GPU 0's models are slow to let go
        m.use_engines(engines)
        on_gpu0 = asyncio.create_task(m.load("e", str(paths["e"]), device=gpu0))
        await asyncio.wait_for(engines.quiescing.wait(), 10)
        # GPU 0's room-making waits for its engine; GPU 1's goes ahead.
        f = await asyncio.wait_for(m.load("f", str(paths["f"]), device=gpu1), 10)
        assert f.state is ModelState.ACTIVE and not on_gpu0.done()
        slept = [
            s.model_id
            for s in m.list_models()
            if s.device == gpu1
            and s.last_transition is not None
            and s.last_transition.cause is Cause.PRESSURE
        ]
        assert len(slept) == 1 and slept[0] in "cd"
        engines.gate.set()
        assert (await asyncio.wait_for(on_gpu0, 10)).state is ModelState.ACTIVE
        for name in "abcdef":
            h.check_bytes(name)
    finally:
        await h.close()
