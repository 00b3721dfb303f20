"""The node as the policies see it: a frozen `NodeView` of the live models,
the backend's pools, the disk cache and the bandwidths measured from recent
transitions.

Built on the event loop (the models are read there only), in O(models +
layers): the housekeeping loop builds one a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from torpord.backends.base import Backend, PoolInfo
from torpord.core.catalogue import Entry
from torpord.core.model import Model, TransitionRecord
from torpord.policies.settings import ModelPolicy, PolicySettings
from torpord.policies.view import (
    ActivitySummary,
    Bandwidth,
    LayerView,
    ModelView,
    NodeView,
    PoolView,
)
from torpord.storage.diskcache import DiskCache
from torpord.types import ModelState, Outcome, Stage, Tier, TransitionKind

__all__ = ["HOST_POOL", "Bandwidths", "build_view", "model_view", "pool_of"]

HOST_POOL = "host"  # the name policies give the host pool (a device's is its uuid)

# A phase that moved less than this says more about overheads than bandwidth.
MIN_MEASURED_BYTES = 1 << 20
# The weight of each new measurement in the moving average.
SMOOTHING = 0.3


class Bandwidths:
    """Each path's rate, a moving average over the transitions that used it
    (their records' phases); the defaults until one has."""

    def __init__(self, defaults: Bandwidth | None = None) -> None:
        self._defaults = defaults or Bandwidth()
        self._rates: dict[str, float] = {}
        self._seen: dict[str, TransitionRecord] = {}  # model id -> its last record counted

    def observe(self, models: Iterable[Model]) -> None:
        """Count each model's last transition, once."""
        present = set()
        for model in models:
            present.add(model.model_id)
            record = model.last_transition
            if record is None or self._seen.get(model.model_id) is record:
                continue
            self._seen[model.model_id] = record
            self._count(record)
        for gone in self._seen.keys() - present:
            del self._seen[gone]

    def _count(self, record: TransitionRecord) -> None:
        if record.outcome is not Outcome.SUCCEEDED:
            return
        for phase in record.phases:
            if phase.bytes < MIN_MEASURED_BYTES or phase.seconds <= 0:
                continue
            path = _path(record.kind, phase.stage)
            if path is None:
                continue
            rate = phase.bytes / phase.seconds
            old = self._rates.get(path)
            self._rates[path] = rate if old is None else old + SMOOTHING * (rate - old)

    def current(self) -> Bandwidth:
        d = self._defaults
        r = self._rates
        return Bandwidth(
            host_to_device=r.get("host_to_device", d.host_to_device),
            device_to_host=r.get("device_to_host", d.device_to_host),
            disk_to_device=r.get("disk_to_device", d.disk_to_device),
            source_to_device=r.get("source_to_device", d.source_to_device),
        )


def _path(kind: TransitionKind, stage: Stage) -> str | None:
    """The path a phase of a transition measures (None: one it can't tell).
    A Wake's reads come from the disk cache or the source, which its record
    doesn't say apart: only a Load's reads measure the source."""
    if kind is TransitionKind.WAKE and stage is Stage.TRANSFER:
        return "host_to_device"
    if kind is TransitionKind.SLEEP and stage is Stage.TRANSFER:
        return "device_to_host"
    if kind is TransitionKind.LOAD and stage is Stage.READ:
        return "source_to_device"
    return None


def pool_view(name: str, info: PoolInfo) -> PoolView:
    return PoolView(name, info.capacity, info.used, info.held)


def model_view(
    model: Model, policy: ModelPolicy, activity: ActivitySummary, *, acting: bool = False
) -> ModelView:
    """`acting`: a policy's action on it is on its way (not yet a transition)."""
    return ModelView(
        model_id=model.model_id,
        state=model.state,
        sleep_level=model.sleep_level,
        device=model.device,
        layers=tuple(
            LayerView(layer.plan.name, layer.plan.size, layer.tier) for layer in model.layers
        ),
        policy=policy,
        activity=activity,
        busy=acting or model.busy or model.state.transitional,
        since=model.update_time,
        engines=model.engines,
        image=bool(model.fingerprint),
        by_caller=model.placed_by_caller,
    )


def build_view(
    models: Iterable[Model],
    backend: Backend,
    disk: DiskCache | None,
    settings: PolicySettings,
    bandwidth: Bandwidth,
    *,
    policy: Callable[[Model], ModelPolicy],
    activity: Callable[[str], ActivitySummary],
    extra: Iterable[ModelView] = (),
    acting: Mapping[str, object] | None = None,
    now: float | None = None,
) -> NodeView:
    """The view of `models` (and `extra`: catalogue entries not loaded)."""
    acting = acting or {}
    views = [
        model_view(m, policy(m), activity(m.model_id), acting=m.model_id in acting)
        for m in models
        if m.state is not ModelState.UNLOADED
    ]
    loaded = {v.model_id for v in views}
    views += [v for v in extra if v.model_id not in loaded]
    return NodeView(
        now=time.time() if now is None else now,
        models=tuple(views),
        devices={d.uuid: pool_view(d.uuid, d.pool) for d in backend.devices()},
        host=pool_view(HOST_POOL, backend.host_pool()),
        disk=PoolView("disk", disk.capacity, disk.used) if disk is not None else None,
        settings=settings,
        bandwidth=bandwidth,
    )


def pool_of(metadata: Mapping[str, str], devices: Iterable[str]) -> str | None:
    """The pool an OUT_OF_MEMORY error names, as policies name it: "host",
    or a device's uuid; None for one that is neither (a disk cache's)."""
    name = metadata.get("pool", "")
    if name == "host pool":
        return HOST_POOL
    uuid = name.removeprefix("device ")
    return uuid if uuid != name and uuid in set(devices) else None


def entry_views(
    entries: Iterable[Entry],
    *,
    device: Callable[[], str],
    activity: Callable[[str], ActivitySummary],
    busy: Callable[[str], bool],
) -> list[ModelView]:
    """Catalogue entries not loaded, as models UNLOADED, their layers on
    their source as its headers plan them (not `sized` while it can't be
    read: room for one is made when its Load finds the device full)."""
    return [
        ModelView(
            model_id=entry.model_id,
            state=ModelState.UNLOADED,
            sleep_level=0,
            device=entry.device or device(),
            layers=tuple(
                LayerView(name, size, Tier.SOURCE)
                for name, size in (entry.size.layers if entry.size is not None else ())
            ),
            sized=entry.size is not None,
            policy=entry.policy,
            activity=activity(entry.model_id),
            since=entry.create_time,
            source=entry.source,
            busy=busy(entry.model_id),
        )
        for entry in entries
    ]
