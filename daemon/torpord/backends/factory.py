"""Choosing and building the backend the config asks for."""

from __future__ import annotations

import os

from torpord.backends.base import Backend
from torpord.backends.host import HostBackend
from torpord.config import Config

__all__ = ["BackendUnavailable", "build_backend"]


class BackendUnavailable(Exception):
    pass


def gpu_visible() -> bool:
    return os.path.exists("/dev/nvidiactl")


def build_backend(config: Config) -> tuple[Backend, str]:
    """The backend, and a sentence on why it was chosen (for the log)."""
    kind = config.backend.kind
    if kind == "cuda" or (kind == "auto" and gpu_visible()):
        if kind == "cuda":
            raise BackendUnavailable(
                'backend.kind = "cuda": the CUDA backend is not part of this release yet;'
                ' use backend.kind = "host" (or "auto")'
            )
        why = "a GPU is visible but the CUDA backend is not in this release: using host"
    else:
        why = "configured" if kind == "host" else "no GPU visible"
    host = config.backend.host
    backend = HostBackend(
        devices=host.devices,
        device_capacity=host.device_capacity,
        host_capacity=config.host_pool.capacity,
    )
    return backend, why
