"""What the pilot's tests share: a node whose device fits two models, the
manager's events as they go, and engines that hold a transition in its
quiesce stage."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from torpor.testing import make_checkpoint
from torpord.core.catalogue import Entry
from torpord.core.events import Event, EventType
from torpord.core.manager import ModelManager
from torpord.core.registry import prepare
from torpord.policies.settings import PolicySettings
from torpord.storage.layers import DEFAULT_LAYER_PATTERNS
from torpord.types import Cause, ModelState

from .harness import Harness, MiB
from .test_engines import Recorder


def model_bytes(tmp: Path, path: Path) -> int:
    _, layers, _ = prepare(str(path), (tmp.resolve(),), DEFAULT_LAYER_PATTERNS, 256, disk=False)
    return sum(layer.plan.size for layer in layers)


class Node:
    """A harness with one device fitting two of the checkpoints (and a half)."""

    def __init__(
        self,
        tmp: Path,
        policy: PolicySettings | None = None,
        host: int = 64 * MiB,
        catalogue: tuple[Entry, ...] = (),
    ):
        """(Housekeeping every 10 ms, when a test starts it.)"""
        self.paths = {
            name: make_checkpoint(tmp / name, layers=4, hidden=64, seed=i)
            for i, name in enumerate("abcd")
        }
        self.size = model_bytes(tmp, self.paths["a"])
        self.h = Harness(
            tmp,
            devices=1,
            device_capacity=self.size * 5 // 2,
            host_capacity=host,
            policy=policy,
            interval=0.01,
            catalogue=catalogue,
        )
        self.m = self.h.manager

    async def load(self, *names: str) -> None:
        for name in names:
            await self.m.load(name, str(self.paths[name]))

    def device_used(self) -> int:
        return self.h.device_used()

    def capacity(self) -> int:
        return self.size * 5 // 2


def evicted(n: Node) -> list[str]:
    return [
        s.model_id
        for s in n.m.list_models()
        if s.last_transition is not None and s.last_transition.cause is Cause.PRESSURE
    ]


class Events:
    """Every event of the manager's bus from now on, collected as it goes."""

    def __init__(self, manager: ModelManager) -> None:
        self.got: list[Event] = []
        self._subscription = manager.bus.subscribe()
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self._subscription:
            self.got.append(event)

    def started(self, state: ModelState) -> list[Cause]:
        """The causes of the transitions that entered `state`, in order."""
        return [
            e.model.progress.cause
            for e in self.got
            if e.type is EventType.CHANGED
            and e.model.state is state
            and e.model.progress is not None
        ]

    def moves(self, *states: ModelState) -> list[tuple[str, ModelState, Cause]]:
        """(model, state, cause) of each transition that entered one of
        `states`, in order, each once (a transition's progress repeats)."""
        return list(
            dict.fromkeys(
                (e.model.model_id, e.model.state, e.model.progress.cause)
                for e in self.got
                if e.model is not None and e.model.progress is not None and e.model.state in states
            )
        )

    async def close(self) -> None:
        await asyncio.sleep(0)
        self._subscription.close()
        await asyncio.wait([self._task], timeout=5)


class Gated(Recorder):
    """Engines that hold a sleep in its quiesce stage until let go."""

    def __init__(self, h: Harness) -> None:
        super().__init__(h)
        self.quiescing = asyncio.Event()
        self.gate = asyncio.Event()

    async def quiesce(self, model_id: str, layers: Sequence[str]) -> list[str]:
        self.quiescing.set()
        await self.gate.wait()
        return await super().quiesce(model_id, layers)
