"""The core's side of the sleep protocol: when it asks engines to let go, what
it announces as layers land, and what a failed wake takes back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from torpord.backends.base import Slab
from torpord.backends.host import HostBackend
from torpord.errors import DataLoss
from torpord.types import ModelState, Stage, Tier

from .harness import Harness


class Recorder:
    """Engines that acknowledge at once, and remember what happened when."""

    def __init__(self, h: Harness, engines: int = 1, notes: Sequence[str] = ()) -> None:
        self.h = h
        self.engines = engines
        self.notes = list(notes)
        self.log: list[tuple[str, tuple[str, ...], int]] = []  # (call, layers, device bytes then)
        self.stages: list[Stage] = []

    def attached(self, model_id: str) -> int:
        return self.engines

    async def quiesce(self, model_id: str, layers: Sequence[str]) -> list[str]:
        model = self.h.manager.registry.models[model_id]
        if model.progress is not None:  # (not at shutdown)
            self.stages.append(model.progress.stage)
        self.log.append(("quiesce", tuple(layers), self.h.device_used()))
        await asyncio.sleep(0)
        return self.notes

    def resume(self, model_id: str, layers: Sequence[str]) -> None:
        model = self.h.manager.registry.models[model_id]
        for name in layers:  # announced only once the layer really is on the device
            layer = model.layer(name)
            assert layer is not None and layer.tier is Tier.DEVICE
        self.log.append(("resume", tuple(layers), self.h.device_used()))

    def unloaded(self, model_id: str) -> None:
        self.log.append(("unloaded", (), self.h.device_used()))


async def test_sleep_quiesces_before_freeing_and_wake_resumes_in_forward_order(
    h: Harness, ckpt: Path
) -> None:
    engines = Recorder(h)
    h.manager.use_engines(engines)
    m = await h.manager.load("m", str(ckpt))
    names = tuple(layer.plan.name for layer in m.layers)
    held = h.device_used()
    engines.log.clear()  # a load announces its layers too (no engine can be attached yet)

    await h.manager.sleep("m", 1)
    assert engines.log == [("quiesce", names, held)]  # asked while the memory was still held
    assert engines.stages == [Stage.QUIESCE]
    engines.log.clear()

    await h.manager.wake("m")
    assert [call for call, _, _ in engines.log] == ["resume"] * len(names)
    assert tuple(layers[0] for _, layers, _ in engines.log) == names  # forward order
    engines.log.clear()

    await h.manager.sleep("m", 2)
    await h.manager.wake("m")  # from the source: announced as each layer lands too
    resumed = [layers for call, layers, _ in engines.log if call == "resume"]
    assert [name for layers in resumed for name in layers] == list(names)  # in forward order
    engines.log.clear()

    await h.manager.unload("m")
    assert engines.log == [("quiesce", names, held), ("unloaded", (), 0)]


async def test_offload_quiesces_just_the_layers_on_the_device(h: Harness, ckpt: Path) -> None:
    engines = Recorder(h)
    h.manager.use_engines(engines)
    await h.manager.load("m", str(ckpt))
    await h.manager.offload("m", ["layers.1", "layers.2"], Tier.HOST)
    await h.manager.offload("m", ["layers.2", "layers.3"], Tier.HOST)  # layers.2 is on HOST
    quiesced = [layers for call, layers, _ in engines.log if call == "quiesce"]
    assert quiesced == [("layers.1", "layers.2"), ("layers.3",)]
    engines.log.clear()
    await h.manager.offload("m", [], Tier.DEVICE)
    assert [layers for call, layers, _ in engines.log] == [
        ("layers.1",),
        ("layers.2",),
        ("layers.3",),
    ]


async def sleep_stages(h: Harness, ckpt: Path, engines: Recorder) -> list[Stage]:
    """Load, then sleep: the stages the sleep's progress events showed a watcher."""
    h.manager.use_engines(engines)
    await h.manager.load("m", str(ckpt))
    sub = h.manager.bus.subscribe("m")
    stages: list[Stage] = []

    async def collect() -> None:
        async for event in sub:
            if event.model.progress is not None:
                stages.append(event.model.progress.stage)

    collector = asyncio.create_task(collect())
    await h.manager.sleep("m", 1)
    await asyncio.sleep(0)
    sub.close()
    await collector
    return stages


async def test_no_engines_no_quiesce_stage(h: Harness, ckpt: Path) -> None:
    engines = Recorder(h, engines=0)
    stages = await sleep_stages(h, ckpt, engines)
    assert stages and Stage.QUIESCE not in stages  # what a watcher sees
    assert "quiesce" not in [call for call, _, _ in engines.log]  # no engine was asked
    assert engines.stages == []
    m = h.manager.get("m")
    assert m.last_transition is not None
    assert Stage.QUIESCE not in [p.stage for p in m.last_transition.phases]


async def test_an_attached_engine_shows_a_quiesce_stage(h: Harness, ckpt: Path) -> None:
    """The check above can see a quiesce stage: with an engine attached, it does."""
    engines = Recorder(h, engines=1)
    stages = await sleep_stages(h, ckpt, engines)
    assert Stage.QUIESCE in stages and engines.stages == [Stage.QUIESCE]


async def test_a_failed_wake_takes_back_what_it_announced(h: Harness, ckpt: Path) -> None:
    engines = Recorder(h)
    h.manager.use_engines(engines)
    await h.manager.load("m", str(ckpt))
    await h.manager.sleep("m", 1)
    layer = h.manager.registry.models["m"].layers[3]
    assert layer.slab is not None
    with h.backend.view(layer.slab) as view:
        view[7] ^= 0x10
    engines.log.clear()
    with pytest.raises(DataLoss):
        await h.manager.wake("m", verify=True)
    resumed = [layers[0] for call, layers, _ in engines.log if call == "resume"]
    assert resumed == ["pre", "layers.0", "layers.1"]  # the three before the corrupt one
    # Taken back before their slabs were freed.
    assert engines.log[-1][0] == "quiesce" and engines.log[-1][1] == tuple(resumed)
    assert engines.log[-1][2] > 0
    assert h.manager.get("m").state is ModelState.ASLEEP and h.device_used() == 0


async def test_engines_detached_on_the_way_are_noted(h: Harness, ckpt: Path) -> None:
    note = "engine (pid 42, rank 0) did not let go of the weights within 1s; detached"
    h.manager.use_engines(Recorder(h, notes=[note]))
    await h.manager.load("m", str(ckpt))
    m = await h.manager.sleep("m", 1)
    assert m.state is ModelState.ASLEEP
    assert m.last_transition is not None and m.last_transition.note == note


class FailingCopies(HostBackend):
    """A driver whose copies fail once `failing` is set."""

    failing = False

    def copy(self, src: Slab, dst: Slab, on_bytes: Callable[[int], None] | None = None) -> None:
        if self.failing:
            raise OSError("copy failed")
        super().copy(src, dst, on_bytes)


async def test_a_failed_offload_gives_the_layers_back_to_the_engines(
    tmp_path: Path, ckpt: Path
) -> None:
    h = Harness(tmp_path, backend=FailingCopies)
    try:
        engines = Recorder(h)
        h.manager.use_engines(engines)
        await h.manager.load("m", str(ckpt))
        engines.log.clear()
        assert isinstance(h.backend, FailingCopies)
        h.backend.failing = True
        with pytest.raises(Exception):  # noqa: B017
            await h.manager.offload("m", ["layers.1"], Tier.HOST)
        assert [(call, layers) for call, layers, _ in engines.log] == [
            ("quiesce", ("layers.1",)),
            ("resume", ("layers.1",)),  # still on the device: the engines may map it again
        ]
        assert h.manager.get("m").state is ModelState.ACTIVE
    finally:
        await h.close()


class SlowToLetGo(Recorder):
    """Engines that take their time letting go of layers a wake announced."""

    def __init__(self, h: Harness) -> None:
        super().__init__(h)
        self.resumed = asyncio.Event()
        self.retracting = asyncio.Event()
        self.gate = asyncio.Event()

    def resume(self, model_id: str, layers: Sequence[str]) -> None:
        super().resume(model_id, layers)
        self.resumed.set()

    async def quiesce(self, model_id: str, layers: Sequence[str]) -> list[str]:
        if self.h.manager.registry.models[model_id].state is ModelState.WAKING:
            self.retracting.set()
            await self.gate.wait()
            self.log.append(("let go", tuple(layers), self.h.device_used()))
        return await super().quiesce(model_id, layers)


async def test_a_wake_cancelled_twice_still_waits_for_engines_to_let_go(
    h: Harness, ckpt: Path
) -> None:
    engines = SlowToLetGo(h)
    h.manager.use_engines(engines)
    await h.manager.load("m", str(ckpt))
    await h.manager.sleep("m", 1)
    engines.resumed.clear()  # (the load announced its layers too)
    await h.manager.wake("m", wait=False)
    task = h.manager.registry.models["m"].task
    assert task is not None
    await asyncio.wait_for(engines.resumed.wait(), 10)
    task.cancel()  # shutdown's cancellation, say
    await asyncio.wait_for(engines.retracting.wait(), 10)
    task.cancel()  # and another, while engines are letting go
    await asyncio.sleep(0.05)
    assert not task.done() and h.device_used() > 0  # nothing freed under the engines
    engines.gate.set()
    await asyncio.wait([task], timeout=10)
    let_go = [entry for entry in engines.log if entry[0] == "let go"]
    assert len(let_go) == 1 and let_go[0][2] > 0  # before the slabs were freed
    m = h.manager.get("m")
    assert m.state is ModelState.ASLEEP and h.device_used() == 0
    assert all(layer.tier is Tier.HOST for layer in m.layers)
