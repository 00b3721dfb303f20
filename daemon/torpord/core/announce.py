"""Telling engines and watchers what happens to a model's memory.

The announcer is the mover's observer: progress goes out on Watch
(throttled, but at once at every stage change), and each layer that lands
on the device is announced to the attached engines, in forward order. It
also holds what a transition asked engines to let go of, so a rollback can
give back what is still on the device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

from torpord.core.engines import Engines, NoEngines
from torpord.core.events import EventBus, EventType
from torpord.core.model import LayerState, Model
from torpord.types import Stage, Tier

__all__ = ["Announcer"]

# Progress is published at most this often (and at every stage change).
PROGRESS_INTERVAL = 0.25


class Announcer:
    def __init__(self, bus: EventBus, engines: Engines | None = None) -> None:
        self.bus = bus
        # The engines attached to models (ModelManager.use_engines sets it).
        self.engines: Engines = engines or NoEngines()
        self._last_publish: dict[int, float] = {}
        # Per model being brought to the device: the layers not yet announced
        # to engines, in forward order, and those of them that have landed.
        self._unannounced: dict[str, tuple[list[str], set[str]]] = {}
        # Per model in a transition: the layers engines were asked to let go of.
        self._quiesced: dict[str, list[str]] = {}

    # -- the mover's observer ----------------------------------------------------

    def progress(self, model: Model, *, force: bool = False) -> None:
        now = time.monotonic()
        last = self._last_publish.get(id(model), 0.0)
        if force or now - last >= PROGRESS_INTERVAL:
            self._last_publish[id(model)] = now
            if model.progress is not None:
                self.bus.publish(EventType.PROGRESS, model.snapshot())

    def landed(self, model: Model, layer: LayerState) -> None:
        """A layer is on the device: engines may map it. Layers of one file land
        out of order (several are read at once); inside `in_forward_order` they
        are announced in forward order, each as soon as it and every layer
        before it have landed."""
        if layer.slab is None or layer.slab.tier is not Tier.DEVICE:
            return
        pending = self._unannounced.get(model.model_id)
        if pending is None:
            self.engines.resume(model.model_id, [layer.plan.name])
            return
        order, landed = pending
        landed.add(layer.plan.name)
        ready = []
        while order and order[0] in landed:
            ready.append(order.pop(0))
        if ready:
            self.engines.resume(model.model_id, ready)

    async def retract(self, model: Model, layers: Sequence[LayerState]) -> None:
        await self.quiesce(model, layers)

    # -- the transitions' ----------------------------------------------------------

    @contextlib.contextmanager
    def in_forward_order(self, model: Model, layers: Sequence[LayerState]) -> Iterator[None]:
        """While `layers` are brought to the device: announce them in their order."""
        self._unannounced[model.model_id] = ([layer.plan.name for layer in layers], set())
        try:
            yield
        finally:
            del self._unannounced[model.model_id]

    async def quiesce(self, model: Model, layers: Sequence[LayerState]) -> None:
        """Before the device slabs of `layers` move or go: every attached engine
        lets go of them (or is detached, which the transition's note says)."""
        names = [layer.plan.name for layer in layers if layer.tier is Tier.DEVICE]
        if not names or not self.engines.attached(model.model_id):
            return
        if model.progress is not None:
            model.progress.stage = Stage.QUIESCE
            self.progress(model, force=True)
        self._quiesced.setdefault(model.model_id, []).extend(names)
        notes = await self.engines.quiesce(model.model_id, names)
        if notes and model.progress is not None:
            earlier = [model.progress.note] if model.progress.note else []
            model.progress.note = "; ".join([*earlier, *notes])
            self.progress(model, force=True)

    def give_back(self, model: Model) -> None:
        """A transition failed: the layers engines let go of that are still on
        the device are theirs again."""
        quiesced = set(self._quiesced.pop(model.model_id, ()))
        back = [
            layer.plan.name
            for layer in model.layers
            if layer.plan.name in quiesced and layer.tier is Tier.DEVICE
        ]
        if back:
            self.engines.resume(model.model_id, back)

    def done(self, model: Model) -> None:
        """The model's transition is over: what it asked engines is settled."""
        self._quiesced.pop(model.model_id, None)

    def forget(self, model: Model) -> None:
        """The model is gone."""
        self._last_publish.pop(id(model), None)
