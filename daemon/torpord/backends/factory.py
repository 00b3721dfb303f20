"""Choosing and building the backend the config asks for."""

from __future__ import annotations

from torpord.backends.base import Backend
from torpord.backends.host import HostBackend
from torpord.backends.nvml import Discovery, discover
from torpord.config import Config
from torpord.errors import TorporError, Unavailable

__all__ = ["BackendUnavailable", "build_backend"]


class BackendUnavailable(Exception):
    pass


def build_backend(config: Config, found: Discovery | None = None) -> tuple[Backend, str]:
    """The backend, and a sentence on why it was chosen (for the log).
    `backend.kind = "cuda"` without a usable GPU is BackendUnavailable;
    "auto" uses the GPUs if the CUDA backend starts on them, else the host
    backend, and says why."""
    kind = config.backend.kind
    if kind in ("cuda", "auto"):
        found = found if found is not None else discover()
        if not found.gpus:
            if kind == "cuda":
                raise BackendUnavailable(
                    f'backend.kind = "cuda" but no GPU is usable: {found.reason}'
                )
            return _host(config), f"no GPU ({found.reason}): using host"
        names = ", ".join(sorted({g.name for g in found.gpus}))
        try:
            backend = _cuda(config)
        except (TorporError, ImportError) as err:
            message = getattr(err, "message", str(err))
            if kind == "cuda":
                raise BackendUnavailable(
                    f'backend.kind = "cuda": the CUDA backend could not start on'
                    f" {len(found.gpus)} GPU(s) ({names}): {message}"
                ) from err
            return _host(config), (
                f"{len(found.gpus)} GPU(s) found ({names}) but the CUDA backend could not"
                f" start: {message}; using host"
            )
        return backend, f"{len(found.gpus)} GPU(s): {names}"
    return _host(config), "configured"


def _host(config: Config) -> Backend:
    host = config.backend.host
    return HostBackend(
        devices=host.devices,
        device_capacity=host.device_capacity,
        host_capacity=config.host_pool.capacity,
    )


def _cuda(config: Config) -> Backend:
    from torpord.backends.cuda import CudaBackend

    cuda = config.backend.cuda
    backend = CudaBackend(
        devices=cuda.devices,
        device_capacity=cuda.device_memory,
        host_capacity=config.host_pool.capacity,
        host_chunk=cuda.pinned_chunk,
        kernel_cache=cuda.kernel_cache,
        kernels=cuda.kernels,
    )
    try:
        backend.prepare()
    except Exception as err:  # kernels = "required": CuPy missing or broken, NVRTC failing
        backend.close()
        raise Unavailable(
            f"its kernels could not be built ({type(err).__name__}: {err})"
            ' and backend.cuda.kernels = "required"',
            reason="CUDA_KERNELS_UNAVAILABLE",
        ) from err
    return backend
