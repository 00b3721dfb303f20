"""The simulated node: where each model's layers are, and what an action does.

`SimNode.commit(action)` applies an action's outcome to the node at once
(the committed state: a model being put to sleep no longer counts on the
device, one being woken already does), and returns the `Transfer` the
engine times: which link it uses and how long it takes (bytes / the
bandwidth of its path). A policy's view therefore never counts memory twice
while transitions run, and a model in transition is `busy`, which policies
must leave alone.

An action the real daemon would refuse (waking an active model, evicting a
model in use, overfilling a pool) raises `PolicyViolation`: the simulator
is also a test of the policy code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from torpord.policies.actions import Action, Load, Offload, Sleep, Unload, Wake
from torpord.policies.settings import PolicySettings
from torpord.policies.view import ActivitySummary, LayerView, ModelView, NodeView, PoolView
from torpord.sim.spec import ModelSpec, NodeSpec
from torpord.types import ModelState, Tier

__all__ = ["DEVICE", "ActivityLike", "PolicyViolation", "SimModel", "SimNode", "Transfer"]

DEVICE = "sim-gpu0"  # the simulated device's uuid


class PolicyViolation(RuntimeError):
    """The policy returned an action the daemon would refuse."""


class ActivityLike(Protocol):
    def record(
        self, now: float, reporter: str, uses: int, busy_seconds: float, in_use: int
    ) -> None: ...

    def summary(self, now: float) -> ActivitySummary: ...


@dataclass(frozen=True)
class Transfer:
    model: SimModel
    action: Action
    link: str  # the path's bottleneck: "source", "disk", "to_device", "to_host"
    seconds: float
    final: ModelState  # the model's state when it is done
    level: int  # its sleep level then


class SimModel:
    def __init__(self, spec: ModelSpec, activity: ActivityLike, since: float) -> None:
        self.spec = spec
        self.model_id = spec.model_id
        base, extra = divmod(spec.size, spec.layers)
        self.sizes = tuple(base + (1 if i < extra else 0) for i in range(spec.layers))
        self.names = tuple(f"layers.{i}" for i in range(spec.layers))
        self.tiers = [Tier.SOURCE] * spec.layers
        self.state = ModelState.UNLOADED
        self.level = 0
        self.since = since
        self.pending = 0  # its transfers not done yet
        self.disk_copy = False
        self.in_flight = 0  # requests using it now
        self.activity = activity
        self.waiters: list[int] = []  # requests waiting for its transition (indices)
        self._layers: tuple[LayerView, ...] | None = None

    @property
    def ready(self) -> bool:
        return (
            self.state is ModelState.ACTIVE
            and not self.pending
            and all(t is Tier.DEVICE for t in self.tiers)
        )

    def layer_views(self) -> tuple[LayerView, ...]:
        if self._layers is None:
            self._layers = tuple(
                LayerView(n, s, t)
                for n, s, t in zip(self.names, self.sizes, self.tiers, strict=True)
            )
        return self._layers

    def moved(self) -> None:
        self._layers = None  # the layer views are built again when next asked for

    def bytes_in(self, tier: Tier) -> int:
        return sum(s for s, t in zip(self.sizes, self.tiers, strict=True) if t is tier)


class SimNode:
    def __init__(
        self,
        spec: NodeSpec,
        settings: PolicySettings,
        activity: Callable[[], ActivityLike],
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.models = {m.model_id: SimModel(m, activity(), spec.start) for m in spec.models}
        self.used = {Tier.DEVICE: 0, Tier.HOST: 0, Tier.DISK: 0}
        self.capacity = {Tier.DEVICE: spec.device, Tier.HOST: spec.host, Tier.DISK: spec.disk or 0}

    def load_everything(self) -> None:
        """Every model ACTIVE on the device (the no-oversubscription reference)."""
        for m in self.models.values():
            self._move(m, range(len(m.tiers)), Tier.DEVICE)
            m.state = ModelState.ACTIVE
        self._check("loading everything")

    def view(self, now: float) -> NodeView:
        models = tuple(
            ModelView(
                model_id=m.model_id,
                state=m.state,
                sleep_level=m.level,
                device=DEVICE,
                layers=m.layer_views(),
                policy=self.settings.default,
                activity=m.activity.summary(now),
                busy=m.pending > 0,
                since=m.since,
                source=f"sim://{m.model_id}",
            )
            for m in self.models.values()
        )
        disk = None
        if self.spec.disk is not None:
            disk = PoolView("disk", self.spec.disk, self.used[Tier.DISK])
        return NodeView(
            now=now,
            models=models,
            devices={DEVICE: PoolView(DEVICE, self.spec.device, self.used[Tier.DEVICE])},
            host=PoolView("host", self.spec.host, self.used[Tier.HOST]),
            disk=disk,
            settings=self.settings,
            bandwidth=self.spec.bandwidth,
        )

    def _move(self, m: SimModel, layers: Iterable[int], tier: Tier) -> None:
        for i in layers:
            old = m.tiers[i]
            if old in self.used:
                self.used[old] -= m.sizes[i]
            if tier in self.used and tier is not Tier.DISK:
                self.used[tier] += m.sizes[i]
            m.tiers[i] = tier
        m.moved()

    def _disk_copy(self, m: SimModel, what: str) -> float:
        """Seconds to write the model's disk copy (0 when it has one)."""
        if m.disk_copy:
            return 0.0
        if self.spec.disk is None:
            raise PolicyViolation(f"{what}: a disk copy, but the node has no disk cache")
        m.disk_copy = True
        self.used[Tier.DISK] += m.spec.size
        # Writing costs what reading back does: the disk is the bottleneck.
        return m.spec.size / self.spec.bandwidth.disk_to_device

    def _to_device_seconds(self, m: SimModel, layers: Iterable[int]) -> tuple[float, str]:
        bw = self.spec.bandwidth
        seconds, link = 0.0, "to_device"
        for i in layers:
            tier = m.tiers[i]
            seconds += bw.seconds_to_device(tier, m.sizes[i])
            if tier is Tier.SOURCE:
                link = "source"
            elif tier is Tier.DISK and link != "source":
                link = "disk"
        return seconds, link

    def commit(self, action: Action) -> Transfer:
        m = self.models.get(action.model_id)
        what = f"{type(action).__name__}({action.model_id}, {action.cause.value})"
        if m is None:
            raise PolicyViolation(f"{what}: no such model")
        if m.pending:
            raise PolicyViolation(f"{what}: the model is in a transition")
        on_device = [i for i, t in enumerate(m.tiers) if t is Tier.DEVICE]
        leaves = isinstance(action, Sleep | Unload) or (
            isinstance(action, Offload) and action.tier is not Tier.DEVICE
        )
        if leaves and m.in_flight and on_device:
            raise PolicyViolation(f"{what}: the model is in use")
        transfer = self._apply(m, action, what, on_device)
        m.pending += 1
        m.state = _TRANSITIONAL[type(action)]
        self._check(what)
        return transfer

    def _apply(self, m: SimModel, action: Action, what: str, on_device: list[int]) -> Transfer:
        bw = self.spec.bandwidth
        every = range(len(m.tiers))
        if isinstance(action, Sleep):
            lifting = m.state is ModelState.ASLEEP and m.level == 2 and action.level == 1
            if not lifting and (
                m.state not in _SLEEPABLE
                or (m.state is ModelState.ASLEEP and action.level <= m.level)
            ):
                raise PolicyViolation(f"{what}: a {m.state.value} model can't sleep at that level")
            if lifting:  # its weights read back into host memory
                away = [i for i in every if m.tiers[i] in (Tier.SOURCE, Tier.DISK)]
                seconds, link = self._to_device_seconds(m, away)
                self._move(m, away, Tier.HOST)
                return Transfer(m, action, link, seconds, ModelState.ASLEEP, 1)
            if action.level == 1:
                seconds = m.bytes_in(Tier.DEVICE) / bw.device_to_host
                self._move(m, on_device, Tier.HOST)
                return Transfer(m, action, "to_host", seconds, ModelState.ASLEEP, 1)
            seconds = self._disk_copy(m, what) if action.disk_copy else 0.0
            self._move(m, every, Tier.DISK if m.disk_copy else Tier.SOURCE)
            return Transfer(m, action, "disk", seconds, ModelState.ASLEEP, 2)
        if isinstance(action, Wake):
            if m.state not in (ModelState.ASLEEP, ModelState.OFFLOADED):
                raise PolicyViolation(f"{what}: a {m.state.value} model can't wake")
            away = [i for i in every if m.tiers[i] is not Tier.DEVICE]
            seconds, link = self._to_device_seconds(m, away)
            self._move(m, away, Tier.DEVICE)
            return Transfer(m, action, link, seconds, ModelState.ACTIVE, 0)
        if isinstance(action, Load):
            if m.state is not ModelState.UNLOADED or action.tier not in (Tier.DEVICE, Tier.HOST):
                raise PolicyViolation(f"{what}: can't load a {m.state.value} model there")
            seconds = m.spec.size / bw.source_to_device
            self._move(m, every, action.tier)
            if action.tier is Tier.DEVICE:
                return Transfer(m, action, "source", seconds, ModelState.ACTIVE, 0)
            return Transfer(m, action, "source", seconds, ModelState.ASLEEP, 1)
        if isinstance(action, Unload):
            if m.state is ModelState.UNLOADED:
                raise PolicyViolation(f"{what}: the model is not loaded")
            self._move(m, every, Tier.SOURCE)
            return Transfer(m, action, "disk", 0.0, ModelState.UNLOADED, 0)
        return self._offload(m, action, what)

    def _offload(self, m: SimModel, action: Offload, what: str) -> Transfer:
        if m.state not in (ModelState.ACTIVE, ModelState.OFFLOADED, ModelState.ASLEEP):
            raise PolicyViolation(f"{what}: can't offload a {m.state.value} model")
        index = {name: i for i, name in enumerate(m.names)}
        if any(name not in index for name in action.layers):
            raise PolicyViolation(f"{what}: names a layer the model does not have")
        chosen = [index[n] for n in action.layers] if action.layers else list(range(len(m.tiers)))
        if action.tier is Tier.DEVICE:
            away = [i for i in chosen if m.tiers[i] is not Tier.DEVICE]
            seconds, link = self._to_device_seconds(m, away)
            self._move(m, away, Tier.DEVICE)
        elif action.tier is Tier.HOST:
            here = [i for i in chosen if m.tiers[i] is Tier.DEVICE]
            seconds = sum(m.sizes[i] for i in here) / self.spec.bandwidth.device_to_host
            link = "to_host"
            self._move(m, here, Tier.HOST)
        elif action.tier is Tier.DISK:
            seconds, link = self._disk_copy(m, what), "disk"
            self._move(m, [i for i in chosen if m.tiers[i] is not Tier.DISK], Tier.DISK)
        else:
            raise PolicyViolation(f"{what}: offload to {action.tier.value}")
        if all(t is Tier.DEVICE for t in m.tiers):
            return Transfer(m, action, link, seconds, ModelState.ACTIVE, 0)
        return Transfer(m, action, link, seconds, ModelState.OFFLOADED, 0)

    def _check(self, what: str) -> None:
        for tier, used in self.used.items():
            if used > self.capacity[tier]:
                raise PolicyViolation(
                    f"{what}: {tier.value} would hold {used} bytes, more than its "
                    f"{self.capacity[tier]}"
                )

    def done(self, transfer: Transfer, now: float) -> None:
        m = transfer.model
        m.pending -= 1
        if not m.pending:
            m.state, m.level, m.since = transfer.final, transfer.level, now


_TRANSITIONAL = {
    Sleep: ModelState.SLEEPING,
    Wake: ModelState.WAKING,
    Load: ModelState.LOADING,
    Unload: ModelState.UNLOADING,
    Offload: ModelState.OFFLOADING,
}
_SLEEPABLE = (ModelState.ACTIVE, ModelState.OFFLOADED, ModelState.ASLEEP)
