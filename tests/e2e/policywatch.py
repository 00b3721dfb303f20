"""What the policy tests watch and call: a WatchModels stream read through
grpcurl, Acquire through grpcurl, and sizes for a device that fits N models."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any

from torpord.core.registry import prepare
from torpord.storage.layers import DEFAULT_LAYER_PATTERNS

from .conftest import GRPCURL, Daemon
from .observe import settle


class Watch:
    """A WatchModels stream (grpcurl), its messages collected as they come."""

    def __init__(self, d: Daemon, model_id: str = "") -> None:
        self.proc = subprocess.Popen(
            [
                GRPCURL,
                "-plaintext",
                "-unix",
                "-d",
                json.dumps({"model_id": model_id}),
                str(d.socket),
                "torpor.v1.ModelService/WatchModels",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # Subscribed once its first message (the snapshot) is in: from then
        # on no change is missed.
        if not settle(lambda: bool(self.messages)):
            self.close()
            raise AssertionError("WatchModels sent no snapshot")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        lines: list[str] = []
        for line in self.proc.stdout:
            lines.append(line)
            if line.rstrip("\n") == "}":  # (grpcurl ends each message so)
                message = json.loads("".join(lines))
                lines = []
                with self._lock:
                    self.messages.append(message)

    def models(self, kind: str = "CHANGED") -> list[dict[str, Any]]:
        """The models of the events of `kind`, in order."""
        with self._lock:
            return [
                m["model_event"]["model"]
                for m in self.messages
                if "model_event" in m and m["model_event"]["type"] == f"MODEL_EVENT_TYPE_{kind}"
            ]

    def started(self, state: str) -> list[tuple[str, str]]:
        """(model id, cause) of each transition that entered `state`, in order."""
        return [
            (m["model_id"], m["progress"].get("cause", "CAUSE_UNSPECIFIED"))
            for m in self.models()
            if m.get("state") == f"MODEL_STATE_{state}" and "progress" in m
        ]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self._reader.join(30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def acquire(d: Daemon, model_id: str) -> dict[str, Any]:
    """AcquireModel through grpcurl: its answer."""
    return d.call("torpor.v1.ModelService/AcquireModel", {"model_id": model_id})


def model_bytes(root: Path, path: Path) -> int:
    """The bytes a checkpoint takes in the daemon (its layers' slabs)."""
    _, layers, _ = prepare(str(path), (root.resolve(),), DEFAULT_LAYER_PATTERNS, 256, disk=False)
    return sum(layer.plan.size for layer in layers)


def one_device(capacity: int, host: str = "256MiB") -> str:
    """The [backend] tables of one emulated device of `capacity` bytes."""
    return (
        f'[backend]\nkind = "host"\n[backend.host]\ndevices = 1\ndevice_capacity = "{capacity}B"\n'
    )


def state(d: Daemon, model_id: str) -> dict[str, Any]:
    model: dict[str, Any] = d.call("torpor.v1.ModelService/GetModel", {"model_id": model_id})[
        "model"
    ]
    return model
