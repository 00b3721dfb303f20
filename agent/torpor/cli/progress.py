"""A progress bar for blocking mutations, fed by WatchModels in a background thread.

While `LoadModel(wait=true)` (or Sleep, Wake, ...) blocks the main thread, a
daemon thread watches the model and redraws one status line on stderr from
its PROGRESS events. The bar is decoration: any failure of the watch ends the
thread quietly and never touches the command's result.
"""

from __future__ import annotations

import shutil
import threading
from types import TracebackType
from typing import Self, TextIO

from torpor.cli.format import human_bytes, kind_label, rate, stage_label
from torpor.cli.render import freeing_text
from torpor.client import Client, ModelWatch
from torpor.v1 import common_pb2, models_pb2

__all__ = ["ProgressBar", "bar_line", "wanted"]

_CLEAR = "\r\x1b[K"
_BAR_WIDTH = 20


def wanted(stream: TextIO) -> bool:
    """Draw only on a terminal: redirected stderr gets nothing."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def bar_line(progress: common_pb2.Progress, columns: int = 80) -> str:
    """`load read [######..............]  30%  4.5 GiB / 15.0 GiB  5.1 GB/s  10/34 layers`.

    What does not fit in `columns` is dropped from the end (layers, then the
    rate) before the line is cut. Memory being let go of (an unload, any
    release stage that moves nothing) gets `unload release  freeing 40.3 MiB`:
    no bar, no rate, for no bytes move.
    """
    parts = [f"{kind_label(progress.kind)} {stage_label(progress.stage)}"]
    freeing = freeing_text(progress)
    if freeing is not None:
        return "  ".join([*parts, freeing])[: max(columns - 1, 10)]
    if progress.bytes_total > 0:
        fraction = min(max(progress.bytes_done / progress.bytes_total, 0.0), 1.0)
        filled = int(fraction * _BAR_WIDTH)
        parts[0] += " [" + "#" * filled + "." * (_BAR_WIDTH - filled) + "]"
        parts.append(f"{int(fraction * 100):3d}%")
        parts.append(f"{human_bytes(progress.bytes_done)} / {human_bytes(progress.bytes_total)}")
    essential = len(parts)
    if progress.bytes_per_second > 0:
        parts.append(rate(progress.bytes_per_second))
    if progress.layers_total > 0:
        parts.append(f"{progress.layers_done}/{progress.layers_total} layers")
    width = max(columns - 1, 10)
    while len(parts) > essential and len("  ".join(parts)) > width:
        parts.pop()
    return "  ".join(parts)[:width]


class ProgressBar:
    """Draws `model_id`'s progress on `stream` until `stop()`.

    Use as a context manager around the blocking call. `drawn` counts the
    lines drawn, and `error` keeps what ended the watch early (if anything), so
    tests can see the thread did no harm.
    """

    def __init__(self, client: Client, model_id: str, stream: TextIO) -> None:
        self._client = client
        self._model_id = model_id
        self._stream = stream
        self._lock = threading.Lock()
        self._stopped = False
        self._watch: ModelWatch | None = None
        self._visible = False
        self._notes: set[str] = set()
        self._thread = threading.Thread(
            target=self._run, name=f"torporctl-progress-{model_id}", daemon=True
        )
        self.drawn = 0
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the watch, wait for the thread and clear the line. Idempotent."""
        with self._lock:
            self._stopped = True
            watch = self._watch
            if self._visible:
                self._write(_CLEAR)
                self._visible = False
        if watch is not None:
            watch.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            with self._lock:
                if self._stopped:
                    return
                self._watch = self._client.watch_models(self._model_id)
            for response in self._watch:
                progress = _progress_of(response, self._model_id)
                if progress is not None:
                    self._draw(progress)
        except Exception as exc:  # the bar must never break the command
            self.error = exc

    def _draw(self, progress: common_pb2.Progress) -> None:
        columns = shutil.get_terminal_size(fallback=(80, 24)).columns
        with self._lock:
            if self._stopped:
                return
            text = _CLEAR
            if progress.note and progress.note not in self._notes:
                # Notes (such as a fallback from O_DIRECT) stay on screen.
                self._notes.add(progress.note)
                text += f"note: {progress.note}\n"
            self._write(text + bar_line(progress, columns))
            self._visible = True
            self.drawn += 1

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass


def _progress_of(
    response: models_pb2.WatchModelsResponse, model_id: str
) -> common_pb2.Progress | None:
    """The progress a message reports for `model_id`, if it reports one."""
    which = response.WhichOneof("event")
    if which == "snapshot":
        # A transition already running (a retried request_id) shows at once.
        for model in response.snapshot.models:
            if model.model_id == model_id and model.HasField("progress"):
                return model.progress
        return None
    if which == "model_event":
        event = response.model_event
        if (
            event.type == models_pb2.MODEL_EVENT_TYPE_PROGRESS
            and event.model.model_id == model_id
            and event.model.HasField("progress")
        ):
            return event.model.progress
    return None
