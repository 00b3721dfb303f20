"""The snapshot of the node that policies decide on.

Built by the daemon from its registry, backend and activity records (or by
the simulator from its simulated node); frozen, so a decision can never see
a half-changed node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torpord.policies.settings import ModelPolicy, PolicySettings
from torpord.types import ModelState, Tier

__all__ = ["ActivitySummary", "Bandwidth", "LayerView", "ModelView", "NodeView", "PoolView"]


@dataclass(frozen=True)
class ActivitySummary:
    """What is known of a model's use (policies/activity.py keeps it)."""

    last_use: float = 0.0  # when a use last began or ended (clock seconds); 0 = never
    in_use: int = 0  # use() blocks and Acquire holds open now
    uses: int = 0  # since the model was first seen
    busy_seconds: float = 0.0  # total time in use
    recent: Mapping[float, int] = field(default_factory=dict)  # window (s) → uses in it
    # Uses per hour of the week (168 counts, Monday 00:00 UTC first), decayed
    # so that recent weeks weigh more; () when nothing was recorded.
    weekly: tuple[float, ...] = ()


@dataclass(frozen=True)
class LayerView:
    name: str
    size: int
    tier: Tier  # DEVICE, HOST, DISK or SOURCE: where it is served from


@dataclass(frozen=True)
class ModelView:
    model_id: str
    state: ModelState  # UNLOADED for a catalogue entry not loaded now
    sleep_level: int
    device: str  # the device uuid it lives on (or would be loaded to)
    layers: tuple[LayerView, ...]
    policy: ModelPolicy
    activity: ActivitySummary
    busy: bool = False  # a transition of it is running
    since: float = 0.0  # when it entered its state (idle time counts from here if never used)
    engines: int = 0
    image: bool = False  # an engine-published image: level 2 needs a disk copy
    source: str = ""  # a catalogue entry's source (to load it), else ""
    # False: a catalogue entry whose size is unknown (its source can't be
    # read now): its `layers` are (), so no room can be planned for it.
    sized: bool = True
    # True: its state was reached by a caller's own call (cause USER): a
    # caller's level-2 Sleep frees host memory on purpose, so no preload
    # reads it back.
    by_caller: bool = False

    def bytes_in(self, tier: Tier) -> int:
        return sum(layer.size for layer in self.layers if layer.tier is tier)

    @property
    def total_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def loaded(self) -> bool:
        return self.state is not ModelState.UNLOADED


@dataclass(frozen=True)
class PoolView:
    name: str  # "host", or a device's uuid
    capacity: int
    used: int  # held included
    held: int = 0  # freed but still mapped by revoked engines (not evictable)

    @property
    def free(self) -> int:
        return self.capacity - self.used


@dataclass(frozen=True)
class Bandwidth:
    """Bytes per second of each path, measured (the daemon's recent
    transitions) or configured (the simulator): the cost of bringing a
    model back from where it would go.

    The defaults are assumptions, not measurements: no GPU host has run
    the benchmarks yet. 20 GB/s is pinned copies over PCIe 4.0 x16 (about
    25 GB/s achievable; PCIe 5.0 doubles it), 3 GB/s one NVMe drive's
    sequential reads, 2 GB/s a source read with a cold page cache (local
    NVMe through the reader's checks, or a network store). The project's
    only measured rates are from a development VM without a GPU, where
    "device" memory is host memory (README, Benchmarks): wake from level
    1 2.6 GB/s, DISK to device 1.2 GB/s, Load from a cold source 0.9 GB/s.
    The daemon replaces each default with its own measurements as
    transitions run; the simulator takes other rates from its spec
    (`bandwidth_gb_per_s`)."""

    host_to_device: float = 20e9
    device_to_host: float = 20e9
    disk_to_device: float = 3e9
    source_to_device: float = 2e9

    def seconds_to_device(self, tier: Tier, nbytes: int) -> float:
        """Time to bring `nbytes` to the device from `tier`."""
        rate = {
            Tier.DEVICE: 0.0,
            Tier.HOST: self.host_to_device,
            Tier.DISK: self.disk_to_device,
            Tier.SOURCE: self.source_to_device,
        }[tier]
        return nbytes / rate if rate else 0.0


@dataclass(frozen=True)
class NodeView:
    now: float  # the clock (seconds since the epoch; simulated in the simulator)
    models: tuple[ModelView, ...]  # loaded models and catalogue entries
    devices: Mapping[str, PoolView]  # uuid → its pool
    host: PoolView
    disk: PoolView | None  # the disk cache, or None when none is configured
    settings: PolicySettings
    bandwidth: Bandwidth = field(default_factory=Bandwidth)

    def model(self, model_id: str) -> ModelView | None:
        for model in self.models:
            if model.model_id == model_id:
                return model
        return None
