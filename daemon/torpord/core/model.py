"""A model held by the daemon, its layers, and immutable snapshots of both.

The manager mutates `Model` on the event loop's thread only; everything that
leaves the core (RPC answers, Watch events) is a frozen `ModelSnapshot` taken
at that moment, so a later change can never alter what was already sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from torpord.backends.base import Slab
from torpord.errors import TorporError
from torpord.policies.activity import Activity
from torpord.policies.settings import ModelPolicy
from torpord.policies.view import ActivitySummary
from torpord.storage.diskcache import DiskEntry
from torpord.storage.layers import LayerPlan
from torpord.storage.safetensors import Checkpoint
from torpord.timeline import Timeline
from torpord.types import Cause, ModelState, Outcome, Stage, Tier, TransitionKind

__all__ = [
    "LayerSnapshot",
    "LayerState",
    "Model",
    "ModelSnapshot",
    "Progress",
    "ProgressSnapshot",
    "Running",
    "TransitionRecord",
]


@dataclass
class LayerState:
    plan: LayerPlan
    slab: Slab | None = None  # in memory (DEVICE or HOST)
    checksum: str = ""
    disk: DiskEntry | None = None  # a copy in the disk cache, if one was written

    @property
    def tier(self) -> Tier:
        """Where the layer is served from: its slab, else its disk copy, else the source."""
        if self.slab is not None:
            return self.slab.tier
        return Tier.DISK if self.disk is not None else Tier.SOURCE


@dataclass(frozen=True)
class ProgressSnapshot:
    kind: TransitionKind
    stage: Stage
    bytes_done: int
    bytes_total: int
    layers_done: int
    layers_total: int
    bytes_per_second: float
    start_time: float
    note: str
    cause: Cause = Cause.USER


@dataclass(frozen=True)
class PhaseRecord:
    """Time a transition spent in one stage: `seconds` of wall time (while at
    least one worker was in it; never more than the transition took) and
    `busy_seconds`, the workers' times summed (more when they overlapped)."""

    stage: Stage
    seconds: float
    bytes: int
    busy_seconds: float = 0.0


# The order phases are reported in.
PHASE_ORDER = (Stage.READ, Stage.TRANSFER, Stage.VERIFY)


@dataclass
class Progress:
    kind: TransitionKind
    bytes_total: int
    layers_total: int
    cause: Cause = Cause.USER
    stage: Stage = Stage.PREPARE
    bytes_done: int = 0
    layers_done: int = 0
    note: str = ""
    start_time: float = field(default_factory=time.time)
    start_clock: float = field(default_factory=time.monotonic)
    # Bytes of memory let go of without being moved anywhere (level-2 sleep,
    # offload to DISK, unload): they are freed, not moved.
    bytes_freed: int = 0
    # Stage -> when workers were in it, and the bytes they handled there.
    phase_times: dict[Stage, Timeline] = field(default_factory=dict)
    phase_bytes: dict[Stage, int] = field(default_factory=dict)
    # Bytes that arrived in a new slab by the tier they came from, and
    # seconds from the start until the first one landed on the device (for
    # the metrics: where a wake came from, how soon an engine could start).
    sources: dict[Tier, int] = field(default_factory=dict)
    first_layer: float | None = None

    def arrived(self, source: Tier, target: Tier, nbytes: int) -> None:
        """A layer of `nbytes` arrived in its new slab in `target`, from `source`."""
        self.sources[source] = self.sources.get(source, 0) + nbytes
        if target is Tier.DEVICE and self.first_layer is None:
            self.first_layer = self.elapsed()

    def main_source(self) -> Tier | None:
        """The tier most of the bytes that arrived came from (None: none did)."""
        return max(self.sources, key=self.sources.__getitem__, default=None)

    @contextlib.contextmanager
    def phase(self, stage: Stage, nbytes: int) -> Iterator[None]:
        """Count the `with` block (one worker's interval), and nbytes, towards
        stage. Blocks of concurrent tasks overlap: their wall time is counted once."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.add_phase(stage, Timeline.of(start, time.monotonic()), nbytes)

    def add_phase(self, stage: Stage, times: Timeline, nbytes: int) -> None:
        """Count workers' intervals (time.monotonic()), and nbytes, towards stage."""
        self.phase_times.setdefault(stage, Timeline()).update(times)
        self.phase_bytes[stage] = self.phase_bytes.get(stage, 0) + nbytes

    def phases(self) -> tuple[PhaseRecord, ...]:
        return tuple(
            PhaseRecord(
                stage,
                self.phase_times[stage].wall,
                self.phase_bytes[stage],
                self.phase_times[stage].busy,
            )
            for stage in PHASE_ORDER
            if stage in self.phase_times
        )

    def elapsed(self) -> float:
        return time.monotonic() - self.start_clock

    def rate(self) -> float:
        elapsed = self.elapsed()
        return self.bytes_done / elapsed if elapsed > 0 else 0.0

    def snapshot(self) -> ProgressSnapshot:
        return ProgressSnapshot(
            self.kind,
            self.stage,
            self.bytes_done,
            self.bytes_total,
            self.layers_done,
            self.layers_total,
            self.rate(),
            self.start_time,
            self.note,
            self.cause,
        )


@dataclass(frozen=True)
class TransitionRecord:
    kind: TransitionKind
    outcome: Outcome
    start_time: float
    duration: float
    bytes: int  # moved: read, copied or written
    request_id: str = ""
    reason: str = ""
    message: str = ""
    phases: tuple[PhaseRecord, ...] = ()
    note: str = ""  # what an operator should know about one that succeeded
    freed: int = 0  # memory let go of without moving it (Progress.bytes_freed)
    cause: Cause = Cause.USER  # who decided it: a caller, or a policy (and which)

    @property
    def bytes_per_second(self) -> float:
        """The rate bytes moved at; 0 when none did (freeing memory has no rate)."""
        return self.bytes / self.duration if self.bytes and self.duration > 0 else 0.0


@dataclass(frozen=True)
class LayerSnapshot:
    plan: LayerPlan
    tier: Tier
    device: str | None
    checksum: str


@dataclass(frozen=True)
class ModelSnapshot:
    model_id: str
    state: ModelState
    state_reason: str
    state_message: str
    sleep_level: int
    checkpoint: Checkpoint
    device: str
    layers: tuple[LayerSnapshot, ...]
    progress: ProgressSnapshot | None
    last_transition: TransitionRecord | None
    create_time: float
    update_time: float
    engines: int = 0
    layout_hash: str = ""  # of the layers' layout: what engines map (storage.layout_hash)
    activity: ActivitySummary = field(default_factory=ActivitySummary)  # its use, now
    policy: ModelPolicy = field(default_factory=ModelPolicy)  # what the daemon's policies apply
    registered: bool = False  # it has a catalogue entry

    @property
    def fingerprint(self) -> str:
        """An image's fingerprint; empty for a model loaded from a source."""
        return self.checkpoint.fingerprint

    def bytes_in(self, tier: Tier) -> int:
        return sum(layer.plan.size for layer in self.layers if layer.tier is tier)

    @property
    def total_bytes(self) -> int:
        return sum(layer.plan.size for layer in self.layers)


@dataclass(eq=False)
class Running:
    """A transition's task, and the one way to stop it at any point of its life.

    A task cancelled before its first step never runs its coroutine, so it
    could never roll back (free what was allocated for it, restore the
    model's state). So `cancel` cancels the task only once it has started;
    before that it leaves the cause, which the transition finds as its first
    step and rolls back from as from any failure."""

    task: asyncio.Task[ModelSnapshot]
    started: bool = False
    cause: TorporError | None = None  # why it was cancelled: its error

    def cancel(self, cause: TorporError) -> None:
        if self.cause is None:
            self.cause = cause
        if self.started and not self.task.done():
            self.task.cancel()


@dataclass(eq=False)
class Model:
    model_id: str
    checkpoint: Checkpoint
    device: str
    layers: list[LayerState]
    state: ModelState = ModelState.LOADING
    state_reason: str = ""
    state_message: str = ""
    sleep_level: int = 0
    progress: Progress | None = None
    last_transition: TransitionRecord | None = None
    running: Running | None = None  # the transition in progress (or the last one)
    # Where a caller (not a policy) last put it: by its last transition, or
    # by a caller's verb that found it there already (policies leave it be).
    placed_by_caller: bool = False
    create_time: float = field(default_factory=time.time)
    update_time: float = field(default_factory=time.time)
    engines: int = 0  # engines attached (kept by the agent registry)
    # The layers' layout hash, computed once where the layers are planned (on
    # a worker: it reads every tensor, too many for the event loop).
    layout_hash: str = ""
    # While an image is PUBLISHING: the attachment id of the engine writing it.
    publisher: str = ""
    # An image whose manifest is in the disk cache: it comes back at the
    # daemon's next start (core/imagedisk.py).
    restorable: bool = False
    # Its use, shared with the manager's ActivityLog (which keeps it across
    # an unload while the id is registered): set as the registry adds it.
    activity: Activity = field(default_factory=Activity)
    # Its policy (set at Load: the request's fields over its catalogue
    # entry's over the config's defaults; SetModelPolicy changes it), and
    # whether it has a catalogue entry. Both kept by the manager.
    policy: ModelPolicy = field(default_factory=ModelPolicy)
    registered: bool = False

    @property
    def fingerprint(self) -> str:
        """An image's fingerprint; empty for a model loaded from a source."""
        return self.checkpoint.fingerprint

    @property
    def source(self) -> str:
        """What the model came from, in words: its source, or the image's fingerprint."""
        if self.fingerprint:
            return f"an image with fingerprint {self.fingerprint}"
        return f"with source {self.checkpoint.path}"

    @property
    def task(self) -> asyncio.Task[ModelSnapshot] | None:
        return self.running.task if self.running is not None else None

    @property
    def busy(self) -> bool:
        return self.running is not None and not self.running.task.done()

    def set_state(self, state: ModelState, reason: str = "", message: str = "") -> None:
        self.state, self.state_reason, self.state_message = state, reason, message
        self.update_time = time.time()

    def settle(self) -> None:
        """The resting state that the layers' residency implies for an awake model."""
        on_device = all(layer.tier is Tier.DEVICE for layer in self.layers)
        self.sleep_level = 0
        self.set_state(ModelState.ACTIVE if on_device else ModelState.OFFLOADED)

    def layer(self, name: str) -> LayerState | None:
        for layer in self.layers:
            if layer.plan.name == name:
                return layer
        return None

    def slabs(self) -> list[Slab]:
        return [layer.slab for layer in self.layers if layer.slab is not None]

    def snapshot(self) -> ModelSnapshot:
        return ModelSnapshot(
            model_id=self.model_id,
            state=self.state,
            state_reason=self.state_reason,
            state_message=self.state_message,
            sleep_level=self.sleep_level,
            checkpoint=self.checkpoint,
            device=self.device,
            layers=tuple(
                LayerSnapshot(
                    layer.plan,
                    layer.tier,
                    layer.slab.device if layer.slab is not None else None,
                    layer.checksum,
                )
                for layer in self.layers
            ),
            progress=self.progress.snapshot() if self.progress is not None else None,
            last_transition=self.last_transition,
            create_time=self.create_time,
            update_time=self.update_time,
            engines=self.engines,
            layout_hash=self.layout_hash,
            activity=self.activity.summary(time.time()),
            policy=self.policy,
            registered=self.registered,
        )
