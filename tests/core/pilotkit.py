"""What the pilot's tests share: the manager's events as they go, and
engines that hold a transition in its quiesce stage."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from torpord.core.events import Event, EventType
from torpord.core.manager import ModelManager
from torpord.types import Cause, ModelState

from .harness import Harness
from .test_engines import Recorder


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
