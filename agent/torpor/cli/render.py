"""Text rendering for torporctl: sizes, enum labels, tables, models, the node."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from google.protobuf import duration_pb2, timestamp_pb2

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


def human_bytes(n: int) -> str:
    """`512 B`, `1.5 KiB`, `15.0 GiB` (binary units)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def rate(bytes_per_second: float) -> str:
    """`5.1 GB/s`, `350 MB/s` under 1 GB/s, `420 kB/s` under 1 MB/s (decimal
    units, as links are quoted): a slow rate never reads as `0 MB/s`."""
    if bytes_per_second >= 1e9:
        return f"{bytes_per_second / 1e9:.1f} GB/s"
    if bytes_per_second >= 1e6:
        return f"{bytes_per_second / 1e6:.0f} MB/s"
    return f"{bytes_per_second / 1e3:.0f} kB/s"


def seconds(duration: duration_pb2.Duration) -> str:
    total = duration.seconds + duration.nanos / 1e9
    if total < 1:
        return f"{total * 1000:.0f}ms"
    if total < 60:
        return f"{total:.1f}s"
    minutes, secs = divmod(int(total), 60)
    return f"{minutes}m{secs:02d}s"


def timestamp(ts: timestamp_pb2.Timestamp) -> str:
    when = datetime.datetime.fromtimestamp(ts.seconds, tz=datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _label(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


def _enum(wrapper: object, value: int, prefix: str) -> str:
    # A newer daemon may send a value this client does not know: show the number.
    try:
        name: str = wrapper.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        return str(value)
    return _label(name, prefix)


def state_label(state: int) -> str:
    return _enum(common_pb2.ModelState, state, "MODEL_STATE_")


def tier_label(tier: int) -> str:
    return _enum(common_pb2.Tier, tier, "TIER_")


def kind_label(kind: int) -> str:
    return _enum(common_pb2.TransitionKind, kind, "TRANSITION_KIND_")


def stage_label(stage: int) -> str:
    return _enum(common_pb2.Stage, stage, "STAGE_")


def outcome_label(outcome: int) -> str:
    return _enum(common_pb2.Outcome, outcome, "OUTCOME_")


def backend_label(backend: int) -> str:
    return _enum(node_pb2.Backend, backend, "BACKEND_")


def event_label(event_type: int) -> str:
    return _enum(models_pb2.ModelEventType, event_type, "MODEL_EVENT_TYPE_")


def device_label(device: str) -> str:
    return device.removeprefix("devices/") or "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns separated by two spaces; the columns in `right` are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def key_values(pairs: Sequence[tuple[str, str]]) -> str:
    width = max((len(key) for key, _ in pairs), default=0) + 1
    return "\n".join(f"{(key + ':').ljust(width)}  {value}" for key, value in pairs)


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
    """`load read 1.0 GiB / 15.0 GiB (6%), 2/34 layers, 5.1 GB/s`, or
    `unload release, freeing 40.3 MiB`."""
    parts = [f"{kind_label(progress.kind)} {stage_label(progress.stage)}"]
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
    """The `list` table. LAYERS is layers on the device / all layers."""
    headers = ["MODEL", "STATE", "SLEEP", "DEVICE", "DEVICE BYTES", "HOST BYTES", "LAYERS", "LAST"]
    rows = [
        [
            model.model_id,
            state_label(model.state) + _pct_suffix(model),
            str(model.sleep_level) if model.sleep_level else "-",
            device_label(model.device),
            human_bytes(model.bytes.device_bytes),
            human_bytes(model.bytes.host_bytes),
            _layers_on_device(model),
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
    if model.HasField("source"):
        source = model.source
        pairs.append(
            (
                "Source",
                f"{source.path} ({_count(len(source.files), 'file')}, "
                f"{_count(source.tensor_count, 'tensor')}, "
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
    text = f"{kind_label(transition.kind)} {outcome_label(transition.outcome)}"
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
