"""What the pilot and Acquire need of the model manager: its state and its
verbs (the manager is one; it owns them, so they can't import it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torpord.backends.base import Backend
from torpord.core.activity import ActivityLog
from torpord.core.catalogue import Catalogue
from torpord.core.model import ModelSnapshot
from torpord.core.registry import Registry
from torpord.core.settings import ManagerSettings
from torpord.core.sizes import Sizes
from torpord.storage.diskcache import DiskCache
from torpord.types import Cause, Tier

__all__ = ["Steered"]


class Steered(Protocol):
    registry: Registry
    activity: ActivityLog
    catalogue: Catalogue
    backend: Backend
    settings: ManagerSettings
    sizes: Sizes

    @property
    def disk(self) -> DiskCache | None: ...

    def known(self, model_id: str) -> bool: ...

    async def load(
        self,
        model_id: str,
        source: str,
        *,
        device: str = "",
        target: Tier = Tier.DEVICE,
        cause: Cause = Cause.USER,
    ) -> ModelSnapshot: ...

    async def sleep(
        self,
        model_id: str,
        level: int = 1,
        *,
        disk_copy: bool = False,
        cause: Cause = Cause.USER,
    ) -> ModelSnapshot: ...

    async def wake(self, model_id: str, *, cause: Cause = Cause.USER) -> ModelSnapshot: ...

    async def offload(
        self,
        model_id: str,
        layers: Sequence[str] = (),
        tier: Tier = Tier.HOST,
        *,
        cause: Cause = Cause.USER,
    ) -> ModelSnapshot: ...

    async def unload(self, model_id: str, *, cause: Cause = Cause.USER) -> ModelSnapshot: ...
