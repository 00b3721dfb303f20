"""Text rendering for torporctl: models, layers, transitions, the node, events
(the pieces they are made of: torpor.cli.format)."""

from __future__ import annotations

from collections.abc import Sequence

from torpor.cli.activity import activity_text, has_activity, kind_and_cause, last_use_cell
from torpor.cli.format import (
    backend_label,
    count,
    device_label,
    event_label,
    human_bytes,
    key_values,
    kind_label,
    outcome_label,
    rate,
    seconds,
    stage_label,
    state_label,
    table,
    tier_label,
    timestamp,
)
from torpor.cli.policytext import policy_pairs
from torpor.v1 import common_pb2, models_pb2, node_pb2

__all__ = [
    "event_lines",
    "freeing_text",
    "human_bytes",
    "key_values",
    "model_details",
    "model_table",
    "node_details",
    "progress_text",
    "rate",
    "state_label",
    "table",
    "unloaded_text",
]


def freeing_text(progress: common_pb2.Progress) -> str | None:
    """`freeing 40.3 MiB` while a transition lets memory go (or `40.3 MiB to
    free` while an unload waits for engines); None while bytes move.

    Freeing moves no bytes: it gets no bar, no percentage and no rate. An
    unload only frees; any transition frees in its release stage (a move has
    moved every byte by then, and its bar at 100% says more).
    """
    size = human_bytes(progress.bytes_total)
    releasing = progress.stage == common_pb2.STAGE_RELEASE
    if releasing and progress.bytes_done < progress.bytes_total:
        return f"freeing {size}"
    if progress.kind == common_pb2.TRANSITION_KIND_UNLOAD:
        return f"freeing {size}" if releasing else f"{size} to free"
    return None


def progress_text(progress: common_pb2.Progress) -> str:
    """`load (user) read 1.0 GiB / 15.0 GiB (6%), 2/34 layers, 5.1 GB/s`, or
    `unload (idle) release, freeing 40.3 MiB`."""
    parts = [f"{kind_and_cause(progress.kind, progress.cause)} {stage_label(progress.stage)}"]
    freeing = freeing_text(progress)
    if freeing is not None:
        return f"{parts[0]}, {freeing}"
    if progress.bytes_total > 0:
        pct = 100 * progress.bytes_done // progress.bytes_total
        parts[0] += (
            f" {human_bytes(progress.bytes_done)} / {human_bytes(progress.bytes_total)} ({pct}%)"
        )
    text = ", ".join(parts)
    if progress.layers_total > 0:
        text += f", {progress.layers_done}/{progress.layers_total} layers"
    if progress.bytes_per_second > 0:
        text += f", {rate(progress.bytes_per_second)}"
    return text


def _state(model: common_pb2.Model) -> str:
    """`asleep (level 1)`, `active`, `failed`."""
    text = state_label(model.state)
    if model.sleep_level:
        text += f" (level {model.sleep_level})"
    return text


def _pct_suffix(model: common_pb2.Model) -> str:
    """` 42%` while a transition with known size moves bytes, else empty (an
    unload moves none: it is not 0% done)."""
    progress = model.progress
    if model.HasField("progress") and progress.bytes_total > 0 and freeing_text(progress) is None:
        return f" {100 * progress.bytes_done // progress.bytes_total}%"
    return ""


def _last(transition: common_pb2.Transition) -> str:
    """`load 2.5s 5.1 GB/s`, `sleep 12ms freed 40.3 MiB`."""
    parts = [kind_label(transition.kind)]
    if transition.outcome != common_pb2.OUTCOME_SUCCEEDED:
        parts.append(outcome_label(transition.outcome))
    if transition.HasField("duration"):
        parts.append(seconds(transition.duration))
    if transition.bytes and transition.bytes_per_second > 0:
        parts.append(rate(transition.bytes_per_second))
    if transition.freed_bytes:
        parts.append(f"freed {human_bytes(transition.freed_bytes)}")
    return " ".join(parts)


def _layers_on_device(model: common_pb2.Model) -> str:
    on_device = sum(1 for layer in model.layers if layer.tier == common_pb2.TIER_DEVICE)
    return f"{on_device}/{len(model.layers)}"


def model_table(models: Sequence[common_pb2.Model]) -> str:
    """The `list` table. LAYERS is layers on the device / all layers; LAST
    USE (from a daemon that reports activity) `in use` or how long ago."""
    headers = ["MODEL", "STATE", "SLEEP", "DEVICE", "DEVICE BYTES", "HOST BYTES", "LAYERS", "LAST"]
    use = any(has_activity(model) for model in models)
    if use:
        headers.insert(-1, "LAST USE")
    rows = [
        [
            model.model_id,
            state_label(model.state) + _pct_suffix(model),
            str(model.sleep_level) if model.sleep_level else "-",
            device_label(model.device),
            human_bytes(model.bytes.device_bytes),
            human_bytes(model.bytes.host_bytes),
            _layers_on_device(model),
            *([last_use_cell(model)] if use else []),
            _last(model.last_transition) if model.HasField("last_transition") else "-",
        ]
        for model in models
    ]
    return table(headers, rows, right=(4, 5, 6))


def layer_table(model: common_pb2.Model) -> str:
    headers = ["LAYER", "TIER", "SIZE", "DEVICE", "CHECKSUM"]
    rows = [
        [
            layer.name,
            tier_label(layer.tier),
            human_bytes(layer.size_bytes),
            device_label(layer.device),
            layer.checksum or "-",
        ]
        for layer in model.layers
    ]
    return table(headers, rows, right=(2,))


def tensor_table(model: common_pb2.Model) -> str:
    headers = ["LAYER", "TENSOR", "DTYPE", "SHAPE", "OFFSET", "SIZE", "FILE"]
    rows = []
    for layer in model.layers:
        for tensor in layer.tensors:
            file = tensor.file_index
            path = model.source.files[file].path if file < len(model.source.files) else str(file)
            rows.append(
                [
                    layer.name,
                    tensor.name,
                    tensor.dtype,
                    "[" + ", ".join(str(d) for d in tensor.shape) + "]",
                    str(tensor.slab_offset),
                    human_bytes(tensor.size_bytes),
                    f"{path}@{tensor.file_offset}",
                ]
            )
    return table(headers, rows, right=(4, 5))


def model_details(model: common_pb2.Model, *, tensors: bool = False) -> str:
    """The `get` view: the model, then its layers (and with `tensors`, every tensor)."""
    pairs = [("Model", model.model_id), ("State", _state(model))]
    if model.state_reason or model.state_message:
        reason = model.state_reason
        if model.state_message:
            reason = f"{reason}: {model.state_message}" if reason else model.state_message
        pairs.append(("Reason", reason))
    pairs.append(("Device", device_label(model.device)))
    if model.fingerprint:  # an image: its engine wrote it; no source file
        source = model.source
        pairs.append(
            (
                "Image",
                f"fingerprint {model.fingerprint} ({count(source.tensor_count, 'tensor')}, "
                f"{human_bytes(source.data_bytes)})",
            )
        )
    elif model.HasField("source") and not model.source.files:  # (registered, not loaded)
        pairs.append(("Source", model.source.path))
    elif model.HasField("source"):
        source = model.source
        pairs.append(
            (
                "Source",
                f"{source.path} ({count(len(source.files), 'file')}, "
                f"{count(source.tensor_count, 'tensor')}, "
                f"{human_bytes(source.data_bytes)})",
            )
        )
    b = model.bytes
    pairs.append(
        (
            "Bytes",
            f"device {human_bytes(b.device_bytes)}, host {human_bytes(b.host_bytes)}, "
            f"disk {human_bytes(b.disk_bytes)}, total {human_bytes(b.total_bytes)}",
        )
    )
    if model.engines:
        pairs.append(("Engines", f"{model.engines} attached"))
    if has_activity(model):
        pairs.append(("Usage", activity_text(model)))
    pairs.extend(policy_pairs(model))
    if model.HasField("progress"):
        pairs.append(("Progress", progress_text(model.progress)))
        if model.progress.note:
            pairs.append(("Note", model.progress.note))
    if model.HasField("last_transition"):
        pairs.append(("Last", _last_details(model.last_transition)))
        if model.last_transition.phases:
            pairs.append(("Phases", _phases(model.last_transition)))
        if model.last_transition.note and not model.HasField("progress"):
            pairs.append(("Note", model.last_transition.note))
    if model.HasField("create_time"):
        pairs.append(("Created", timestamp(model.create_time)))
    if model.HasField("update_time"):
        pairs.append(("Updated", timestamp(model.update_time)))
    parts = [key_values(pairs)]
    if model.layers:
        parts.append(layer_table(model))
    if tensors and any(layer.tensors for layer in model.layers):
        parts.append(tensor_table(model))
    return "\n\n".join(parts)


def _last_details(transition: common_pb2.Transition) -> str:
    """`load succeeded in 1.2s, 40.3 MiB at 35 MB/s`; a transition that only
    let memory go says `freed 40.3 MiB` and gives no rate."""
    text = (
        f"{kind_and_cause(transition.kind, transition.cause)} {outcome_label(transition.outcome)}"
    )
    if transition.HasField("duration"):
        text += f" in {seconds(transition.duration)}"
    if transition.bytes:
        text += f", {human_bytes(transition.bytes)}"
        if transition.bytes_per_second > 0:
            text += f" at {rate(transition.bytes_per_second)}"
    if transition.freed_bytes:
        text += f", freed {human_bytes(transition.freed_bytes)}"
    if transition.request_id:
        text += f" (request {transition.request_id})"
    if transition.reason or transition.message:
        text += f": {transition.reason} {transition.message}".rstrip()
    return text


def _phases(transition: common_pb2.Transition) -> str:
    """`read 1.2s, verify 0.3s` (wall time: while any worker was in the phase),
    then, where workers overlapped, their busy time summed, labelled as such:
    `read 1.2s, verify 0.3s (busy, summed over workers: read 5.4s)`."""
    walls = [f"{stage_label(p.stage)} {seconds(p.duration)}" for p in transition.phases]
    busy = [
        f"{stage_label(p.stage)} {seconds(p.busy)}"
        for p in transition.phases
        if p.HasField("busy") and seconds(p.busy) != seconds(p.duration)
    ]
    text = ", ".join(walls)
    if busy:
        text += f" (busy, summed over workers: {', '.join(busy)})"
    return text


def unloaded_text(model: common_pb2.Model) -> str:
    """`Unloaded model 'demo' (freed 40.3 MiB in 12ms)`."""
    transition = model.last_transition
    facts = [f"freed {human_bytes(transition.freed_bytes)}"]
    if transition.HasField("duration"):
        facts.append(f"in {seconds(transition.duration)}")
    text = f"Unloaded model {model.model_id!r} ({' '.join(facts)})"
    if transition.note:
        text += f"\nNote: {transition.note}"
    return text


def node_details(node: node_pb2.Node) -> str:
    pool = node.host_pool
    pairs = [
        ("Hostname", node.hostname),
        ("Version", node.version),
        (
            "Backend",
            backend_label(node.backend)
            + (f" ({node.backend_reason})" if node.backend_reason else ""),
        ),
        ("Models", str(node.model_count)),
        (
            "Host pool",
            f"{human_bytes(pool.used_bytes)} used of {human_bytes(pool.capacity_bytes)} "
            f"({human_bytes(pool.free_bytes)} free, {pool.slab_count} slabs)",
        ),
    ]
    cache = node.disk_cache
    if cache.enabled:
        pairs.append(
            (
                "Disk cache",
                f"{cache.path}: {human_bytes(cache.used_bytes)} used of "
                f"{human_bytes(cache.capacity_bytes)}",
            )
        )
    else:
        pairs.append(("Disk cache", "disabled"))
    pairs.append(("Allowed roots", ", ".join(node.allowed_roots) or "-"))
    parts = [key_values(pairs)]
    if node.devices:
        rows = [
            [
                device.uuid or device_label(device.name),
                str(device.index),
                device.display_name,
                human_bytes(device.used_bytes)
                + (f" ({human_bytes(device.held_bytes)} held)" if device.held_bytes else ""),
                human_bytes(device.free_bytes),
                human_bytes(device.capacity_bytes),
                str(device.slab_count),
            ]
            for device in node.devices
        ]
        headers = ["DEVICE", "INDEX", "NAME", "USED", "FREE", "CAPACITY", "SLABS"]
        parts.append(table(headers, rows, right=(1, 3, 4, 5, 6)))
    if node.gpus:
        gpus = [
            [
                gpu.uuid,
                str(gpu.index),
                gpu.display_name,
                f"{human_bytes(gpu.memory_used_bytes)} / {human_bytes(gpu.memory_total_bytes)}",
                f"gen{gpu.pcie_generation} x{gpu.pcie_width}" if gpu.pcie_width else "-",
                str(len(gpu.processes)),
            ]
            for gpu in node.gpus
        ]
        headers = ["GPU", "INDEX", "NAME", "MEMORY USED", "PCIE", "PROCESSES"]
        parts.append(table(headers, gpus, right=(1, 5)))
        if node.gpu_discovery:  # some GPUs did not answer the driver
            parts.append(key_values([("GPUs", f"missing: {node.gpu_discovery}")]))
    else:
        parts.append(key_values([("GPUs", f"none: {node.gpu_discovery or 'not reported'}")]))
    return "\n\n".join(parts)


def _model_summary(model: common_pb2.Model) -> str:
    b = model.bytes
    text = (
        f"{model.model_id}  {_state(model)}  "
        f"device={device_label(model.device)}  "
        f"device_bytes={human_bytes(b.device_bytes)}  host_bytes={human_bytes(b.host_bytes)}"
    )
    if model.state_reason:
        text += f"  reason={model.state_reason}"
    if model.HasField("progress"):  # what is happening to it, and why
        text += f"  transition={kind_and_cause(model.progress.kind, model.progress.cause)}"
    elif model.HasField("last_transition"):
        last = model.last_transition
        text += f"  last={kind_and_cause(last.kind, last.cause)} {outcome_label(last.outcome)}"
    return text


def event_lines(response: models_pb2.WatchModelsResponse) -> list[str]:
    """One line per model of a snapshot, or one line for an event."""
    which = response.WhichOneof("event")
    if which == "snapshot":
        models = response.snapshot.models
        if not models:
            return ["snapshot  (no models)"]
        return [f"snapshot  {_model_summary(model)}" for model in models]
    if which == "model_event":
        event = response.model_event
        label = event_label(event.type)
        if event.type == models_pb2.MODEL_EVENT_TYPE_PROGRESS:
            return [f"{label}  {event.model.model_id}  {progress_text(event.model.progress)}"]
        return [f"{label}  {_model_summary(event.model)}"]
    return ["unknown event"]
