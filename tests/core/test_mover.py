"""The mover alone, driven through its one seam: a recording MoveObserver."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from torpord.backends.host import HostBackend
from torpord.core.model import LayerState, Model, Progress
from torpord.core.mover import Mover
from torpord.core.observer import NoObserver
from torpord.core.registry import prepare
from torpord.errors import DataLoss
from torpord.storage.layers import DEFAULT_LAYER_PATTERNS
from torpord.types import Stage, Tier, TransitionKind

from .harness import MiB, expected_slab


class Recorder:
    """Remembers what the mover told, and what was true when it did."""

    def __init__(self, backend: HostBackend) -> None:
        self.backend = backend
        self.log: list[tuple[str, tuple[str, ...]]] = []
        self.stages: list[Stage] = []
        self.live_at_retract: list[bool] = []

    def progress(self, model: Model, *, force: bool = False) -> None:
        assert model.progress is not None
        if force:
            self.stages.append(model.progress.stage)

    def landed(self, model: Model, layer: LayerState) -> None:
        # Told only once the layer points at its new slab, filled with its bytes.
        assert layer.slab is not None
        with self.backend.view(layer.slab) as view:
            files = [f.path for f in model.checkpoint.files]
            assert bytes(view) == expected_slab(layer.plan, files), layer.plan.name
        self.log.append(("landed", (layer.plan.name,)))

    async def retract(self, model: Model, layers: Sequence[LayerState]) -> None:
        self.live_at_retract = [layer.slab is not None and not layer.slab.freed for layer in layers]
        self.log.append(("retract", tuple(layer.plan.name for layer in layers)))


@pytest.fixture
def backend() -> Iterator[HostBackend]:
    backend = HostBackend(devices=1, device_capacity=64 * MiB, host_capacity=64 * MiB)
    yield backend
    backend.close()


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        yield pool


def a_model(tmp_path: Path, ckpt: Path, backend: HostBackend) -> Model:
    checkpoint, layers, _ = prepare(
        str(ckpt), (tmp_path.resolve(),), DEFAULT_LAYER_PATTERNS, 256, disk=False
    )
    return Model("m", checkpoint, backend.pick_device(), layers)


def begin(model: Model, layers: Sequence[LayerState]) -> None:
    total = sum(layer.plan.size for layer in layers)
    model.progress = Progress(TransitionKind.WAKE, total, len(layers))


async def test_the_observer_hears_every_layer_land_and_every_stage(
    tmp_path: Path, ckpt: Path, backend: HostBackend, executor: concurrent.futures.Executor
) -> None:
    model = a_model(tmp_path, ckpt, backend)
    seen = Recorder(backend)
    mover = Mover(backend, executor, seen)
    begin(model, model.layers)
    new = mover.allocate(model, model.layers, Tier.DEVICE)
    await mover.move(model, model.layers, new)
    names = [layer.plan.name for layer in model.layers]
    # From the source, each layer once (several are read at once: in any order).
    assert sorted(name for _, (name,) in seen.log) == sorted(names)
    assert seen.stages[0] is Stage.READ and seen.stages[-1] is Stage.RELEASE

    # To HOST, one layer at a time: in forward order.
    seen.log.clear()
    begin(model, model.layers)
    await mover.move(model, model.layers, mover.allocate(model, model.layers, Tier.HOST))
    assert seen.log == [("landed", (name,)) for name in names]
    assert all(layer.tier is Tier.HOST for layer in model.layers)


async def test_a_failed_move_retracts_what_landed_before_freeing_it(
    tmp_path: Path, ckpt: Path, backend: HostBackend, executor: concurrent.futures.Executor
) -> None:
    model = a_model(tmp_path, ckpt, backend)
    mover = Mover(backend, executor)  # (no observer: reports to nobody)
    assert isinstance(mover.observer, NoObserver)
    begin(model, model.layers)
    await mover.move(model, model.layers, mover.allocate(model, model.layers, Tier.HOST))
    corrupt = model.layers[3]
    assert corrupt.slab is not None
    with backend.view(corrupt.slab) as view:
        view[7] ^= 0x10
    old = [layer.slab for layer in model.layers]

    seen = Recorder(backend)
    mover = Mover(backend, executor, seen)
    begin(model, model.layers)
    new = mover.allocate(model, model.layers, Tier.DEVICE)
    with pytest.raises(DataLoss):
        await mover.move(model, model.layers, new, verify=True)
    before = tuple(layer.plan.name for layer in model.layers[:3])
    assert seen.log == [*(("landed", (name,)) for name in before), ("retract", before)]
    assert seen.live_at_retract == [True, True, True]  # asked before the slabs were freed
    assert [layer.slab for layer in model.layers] == old  # as it was
    assert all(slab.freed for slab in new)
    assert sum(d.pool.used for d in backend.devices()) == 0
