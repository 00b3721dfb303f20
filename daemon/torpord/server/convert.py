"""Core snapshots to torpor.v1 messages, and request enums to core enums."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from torpor.v1 import common_pb2, models_pb2, node_pb2

from torpord.backends.base import Backend
from torpord.backends.nvml import Discovery
from torpord.core.model import ModelSnapshot, ProgressSnapshot, TransitionRecord
from torpord.errors import InvalidArgument
from torpord.policies.view import ActivitySummary
from torpord.server.policyconvert import policy_to_proto
from torpord.storage.diskcache import DiskCache
from torpord.storage.gcpause import gc_paused
from torpord.storage.layers import LayerPlan
from torpord.types import ModelState, Outcome, Stage, Tier, TransitionKind

__all__ = [
    "activity_to_proto",
    "duration_seconds",
    "model_to_proto",
    "node_to_proto",
    "prepare_full",
    "tier_from_proto",
]

# A layer's tensor list (MODEL_VIEW_FULL) as a serialized Layer holding only
# `tensors`, per plan (by id, dropped with the plan). A plan never changes, so
# it is converted once (off the event loop, by prepare_full); every FULL view
# after that merges the bytes in C. At the tensor limit building the list
# takes seconds; merging it, tens of milliseconds.
_TENSORS: dict[int, bytes] = {}
_PIECE = 4096  # tensors serialized per call


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(timedelta(seconds=seconds))
    return d


def duration_seconds(d: duration_pb2.Duration) -> float:
    """A request's Duration in seconds, whatever its fields hold (validating
    it is the caller's: ToTimedelta would raise on out-of-range values)."""
    return d.seconds + d.nanos / 1e9


def activity_to_proto(a: ActivitySummary) -> common_pb2.Activity:
    out = common_pb2.Activity(
        in_use=a.in_use,
        uses=a.uses,
        busy=_duration(a.busy_seconds),
        uses_last_minute=a.recent.get(60.0, 0),
        uses_last_hour=a.recent.get(3600.0, 0),
        uses_last_day=a.recent.get(86400.0, 0),
    )
    if a.last_use:  # (unset: never used)
        out.last_use_time.CopyFrom(_timestamp(a.last_use))
    return out


def _enum(enum_type: Any, prefix: str, value: str) -> Any:
    return enum_type.Value(f"{prefix}_{value}")


def tier_to_proto(tier: Tier) -> common_pb2.Tier.ValueType:
    return common_pb2.Tier.Value(f"TIER_{tier.value}")


def tier_from_proto(value: int, *, default: Tier, field: str) -> Tier:
    if value == common_pb2.TIER_UNSPECIFIED:
        return default
    try:
        return Tier(common_pb2.Tier.Name(value).removeprefix("TIER_"))  # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgument(
            f"{field}: unknown tier {value}", reason="INVALID_TIER", metadata={"field": field}
        ) from None


def _progress(p: ProgressSnapshot) -> common_pb2.Progress:
    return common_pb2.Progress(
        kind=_enum(common_pb2.TransitionKind, "TRANSITION_KIND", p.kind.value),
        stage=_enum(common_pb2.Stage, "STAGE", p.stage.value),
        bytes_done=p.bytes_done,
        bytes_total=p.bytes_total,
        layers_done=p.layers_done,
        layers_total=p.layers_total,
        bytes_per_second=p.bytes_per_second,
        start_time=_timestamp(p.start_time),
        note=p.note,
        cause=_enum(common_pb2.Cause, "CAUSE", p.cause.value),
    )


def _transition(t: TransitionRecord) -> common_pb2.Transition:
    return common_pb2.Transition(
        kind=_enum(common_pb2.TransitionKind, "TRANSITION_KIND", t.kind.value),
        outcome=_enum(common_pb2.Outcome, "OUTCOME", t.outcome.value),
        start_time=_timestamp(t.start_time),
        duration=_duration(t.duration),
        bytes=t.bytes,
        bytes_per_second=t.bytes_per_second,
        request_id=t.request_id,
        reason=t.reason,
        message=t.message,
        phases=[
            common_pb2.Phase(
                stage=_enum(common_pb2.Stage, "STAGE", p.stage.value),
                duration=_duration(p.seconds),
                bytes=p.bytes,
                busy=_duration(p.busy_seconds),
            )
            for p in t.phases
        ],
        note=t.note,
        freed_bytes=t.freed,
        cause=_enum(common_pb2.Cause, "CAUSE", t.cause.value),
    )


def _tensors(plan: LayerPlan) -> bytes:
    """The serialized tensor list of `plan` (kept while the plan lives)."""
    cached = _TENSORS.get(id(plan))
    if cached is not None:
        return cached
    # A repeated field serializes as its items one after another, so pieces
    # can be joined; each piece is a short call into the protobuf library,
    # which holds the GIL throughout (one call for the whole list would stop
    # the event loop's thread for as long).
    pieces = []
    for start in range(0, len(plan.tensors), _PIECE):
        pieces.append(
            common_pb2.Layer(
                tensors=[
                    common_pb2.Tensor(
                        name=p.tensor.name,
                        dtype=p.tensor.dtype,
                        shape=p.tensor.shape,
                        slab_offset=p.slab_offset,
                        size_bytes=p.tensor.nbytes,
                        file_index=p.tensor.file_index,
                        file_offset=p.tensor.file_offset,
                    )
                    for p in plan.tensors[start : start + _PIECE]
                ]
            ).SerializeToString()
        )
    data = b"".join(pieces)
    if id(plan) not in _TENSORS:  # (another thread may have made it meanwhile)
        _TENSORS[id(plan)] = data
        weakref.finalize(plan, _TENSORS.pop, id(plan), None)
    return _TENSORS[id(plan)]


async def prepare_full(models: Sequence[ModelSnapshot]) -> None:
    """Convert the tensor lists `model_to_proto(full=True)` will need and has
    not got yet, on a worker thread: O(tensors) Python work that would stall
    every other RPC if done on the event loop."""
    plans = [layer.plan for m in models for layer in m.layers if id(layer.plan) not in _TENSORS]
    if plans:
        await asyncio.to_thread(_convert, plans)


def _convert(plans: list[LayerPlan]) -> None:
    with gc_paused():
        for plan in plans:
            _tensors(plan)


def model_to_proto(m: ModelSnapshot, *, full: bool = False) -> common_pb2.Model:
    source = common_pb2.Source(
        path=m.checkpoint.path,
        files=[
            common_pb2.SourceFile(
                path=f.path, size_bytes=f.size, modify_time=_timestamp(f.mtime_ns / 1e9)
            )
            for f in m.checkpoint.files
        ],
        tensor_count=len(m.checkpoint.tensors),
        data_bytes=m.checkpoint.data_bytes,
    )
    out = common_pb2.Model(
        name=f"models/{m.model_id}",
        model_id=m.model_id,
        state=_enum(common_pb2.ModelState, "MODEL_STATE", m.state.value),
        state_reason=m.state_reason,
        state_message=m.state_message,
        sleep_level=m.sleep_level,
        source=source,
        device=f"devices/{m.device}" if m.device else "",
        bytes=common_pb2.TierBytes(
            device_bytes=m.bytes_in(Tier.DEVICE),
            host_bytes=m.bytes_in(Tier.HOST),
            disk_bytes=m.bytes_in(Tier.DISK),
            total_bytes=m.total_bytes,
        ),
        create_time=_timestamp(m.create_time),
        update_time=_timestamp(m.update_time),
        engines=m.engines,
        fingerprint=m.checkpoint.fingerprint,
        activity=activity_to_proto(m.activity),
        policy=policy_to_proto(m.policy),
        registered=m.registered,
    )
    for layer in m.layers:
        # Added in place: a Layer built apart would be copied into the Model,
        # its tensors and all.
        msg = out.layers.add(
            name=layer.plan.name,
            index=layer.plan.index,
            size_bytes=layer.plan.size,
            tier=tier_to_proto(layer.tier),
            device=f"devices/{layer.device}" if layer.device else "",
            tensor_count=len(layer.plan.tensors),
            checksum=layer.checksum,
        )
        if full:
            msg.MergeFromString(_tensors(layer.plan))
    if m.progress is not None:
        out.progress.CopyFrom(_progress(m.progress))
    if m.last_transition is not None:
        out.last_transition.CopyFrom(_transition(m.last_transition))
    return out


def is_full(view: int) -> bool:
    return view == models_pb2.MODEL_VIEW_FULL


def node_to_proto(
    backend: Backend,
    *,
    hostname: str,
    version: str,
    model_count: int,
    allowed_roots: list[str],
    disk: DiskCache | None,
    found: Discovery | None = None,
) -> node_pb2.Node:
    pool = backend.host_pool()
    return node_pb2.Node(
        hostname=hostname,
        version=version,
        backend=node_pb2.Backend.Value(f"BACKEND_{backend.kind.upper()}"),
        devices=[
            node_pb2.Device(
                name=f"devices/{d.uuid}",
                uuid=d.uuid,
                index=d.index,
                display_name=d.name,
                capacity_bytes=d.pool.capacity,
                used_bytes=d.pool.used,
                free_bytes=d.pool.free,
                slab_count=d.pool.slab_count,
                held_bytes=d.pool.held,
            )
            for d in backend.devices()
        ],
        host_pool=node_pb2.HostPool(
            capacity_bytes=pool.capacity,
            used_bytes=pool.used,
            free_bytes=pool.free,
            slab_count=pool.slab_count,
        ),
        disk_cache=node_pb2.DiskCache(
            enabled=disk is not None,
            path=str(disk.root) if disk else "",
            capacity_bytes=disk.capacity if disk else 0,
            used_bytes=disk.used if disk else 0,
        ),
        model_count=model_count,
        allowed_roots=allowed_roots,
        gpus=[
            node_pb2.Gpu(
                uuid=g.uuid,
                index=g.index,
                display_name=g.name,
                memory_total_bytes=g.memory_total,
                memory_used_bytes=g.memory_used,
                memory_free_bytes=g.memory_free,
                pcie_generation=g.pcie_generation,
                pcie_width=g.pcie_width,
                pcie_max_generation=g.pcie_max_generation,
                pcie_max_width=g.pcie_max_width,
                processes=[
                    node_pb2.GpuProcess(pid=p.pid, used_memory_bytes=p.used_memory or 0)
                    for p in g.processes
                ],
            )
            for g in (found.gpus if found else ())
        ],
        gpu_discovery=found.reason if found else "",
    )


# Keep the enum mirrors honest: every core value must have a proto value.
for _enum_cls, _proto, _prefix in (
    (ModelState, common_pb2.ModelState, "MODEL_STATE"),
    (Stage, common_pb2.Stage, "STAGE"),
    (Outcome, common_pb2.Outcome, "OUTCOME"),
    (TransitionKind, common_pb2.TransitionKind, "TRANSITION_KIND"),
    (Tier, common_pb2.Tier, "TIER"),
):
    for _member in _enum_cls:
        _proto.Value(f"{_prefix}_{_member.value}")
