"""RegisterModel, DeregisterModel and SetModelPolicy: the catalogue's entries
and models' policies, changed at run time (the manager's public methods
call these).

None of them moves a byte or waits for a transition: a policy is data, so a
model in the middle of a transition can have its policy changed, and the
policies read the new one at their next decision. A loaded model whose
policy or registration changes is announced (a CHANGED event). Register
reads the source's headers (core/sizes.py): the entry's size, and a
source a Load would refuse is refused with the Load's reasons.
"""

from __future__ import annotations

import types
from dataclasses import replace

from torpord.backends.base import Backend
from torpord.core.catalogue import Catalogue, Entry
from torpord.core.events import EventBus, EventType
from torpord.core.model import Model, ModelSnapshot
from torpord.core.policy import PolicyOverrides, check_policy
from torpord.core.registry import Registry, check_model_id
from torpord.core.sizes import Sizes
from torpord.errors import NotFound
from torpord.policies.view import ActivitySummary
from torpord.storage.safetensors import Checkpoint
from torpord.types import ModelState

__all__ = ["Registrar", "unloaded"]


def unloaded(entry: Entry, activity: ActivitySummary) -> ModelSnapshot:
    """What GetModel and ListModels say of a registered model that is not
    loaded: UNLOADED, its source, device, policy and use, no layers."""
    checkpoint = Checkpoint(entry.source, (), (), types.MappingProxyType({}))
    return ModelSnapshot(
        model_id=entry.model_id,
        state=ModelState.UNLOADED,
        state_reason="",
        state_message="",
        sleep_level=0,
        checkpoint=checkpoint,
        device=entry.device,
        layers=(),
        progress=None,
        last_transition=None,
        create_time=entry.create_time,
        update_time=entry.create_time,
        policy=entry.policy,
        registered=True,
        activity=activity,
    )


class Registrar:
    def __init__(
        self,
        catalogue: Catalogue,
        registry: Registry,
        bus: EventBus,
        backend: Backend,
        sizes: Sizes,
    ) -> None:
        self._catalogue = catalogue
        self._registry = registry
        self._bus = bus
        self._backend = backend
        self._sizes = sizes  # reads a source's size (core/sizes.py)

    def get(self, model_id: str) -> ModelSnapshot:
        """A loaded model's snapshot, else its entry's (UNLOADED), else NOT_FOUND."""
        model = self._registry.find(model_id)
        if model is not None:
            return model.snapshot()
        entry = self._catalogue.get(model_id)
        if entry is not None:
            return unloaded(entry, self._registry.activity.summary(model_id))
        return self._registry.get(model_id)  # (NOT_FOUND, or INVALID_MODEL_ID)

    def snapshots(self, *, registered: bool) -> list[ModelSnapshot]:
        """Every loaded model; with `registered`, and every entry not loaded."""
        models = self._registry.snapshots()
        if not registered:
            return models
        loaded = {m.model_id for m in models}
        summary = self._registry.activity.summary
        models += [
            unloaded(e, summary(e.model_id))
            for e in self._catalogue.entries()
            if e.model_id not in loaded
        ]
        return sorted(models, key=lambda m: m.model_id)

    async def register(
        self, model_id: str, source: str, device: str, policy: PolicyOverrides, *, disk: bool
    ) -> ModelSnapshot:
        """Add or replace `model_id`'s entry (its policy: `policy` over the
        defaults). A loaded model takes the entry's policy; nothing else of it
        changes. The source is read as a Load reads it (its errors)."""
        check_model_id(model_id)
        check_policy(policy, disk=disk)
        uuid = self._backend.resolve_device(device) if device else ""
        size = await self._sizes.measure(source)
        entry = Entry(model_id, source, uuid, policy.over(self._catalogue.default), size=size)
        self._catalogue.put(entry)
        model = self._registry.find(model_id)
        if model is not None:
            model.policy, model.registered = entry.policy, True
            self._changed(model)
        return self.get(model_id)

    def deregister(self, model_id: str) -> None:
        """Remove `model_id`'s entry; a loaded model stays as it is, unregistered."""
        check_model_id(model_id)
        self._catalogue.remove(model_id)
        model = self._registry.find(model_id)
        if model is not None:
            model.registered = False
            self._changed(model)

    def set_policy(self, model_id: str, policy: PolicyOverrides, *, disk: bool) -> ModelSnapshot:
        """Set the fields `policy` sets, on the loaded model and on its entry
        (each keeps the fields left unset)."""
        check_model_id(model_id)
        check_policy(policy, disk=disk)
        model = self._registry.find(model_id)
        entry = self._catalogue.get(model_id)
        if model is None and entry is None:
            raise NotFound(
                f"model {model_id!r} is neither loaded nor registered",
                reason="MODEL_NOT_FOUND",
                metadata={"model_id": model_id},
            )
        if entry is not None:
            self._catalogue.put(replace(entry, policy=policy.over(entry.policy)))
        if model is not None:
            model.policy = policy.over(model.policy)
            self._changed(model)
        return self.get(model_id)

    def _changed(self, model: Model) -> None:
        self._bus.publish(EventType.CHANGED, model.snapshot())
