"""The node's GPUs as the driver reports them (NVML, package `nvidia-ml-py`).

`discover()` never raises: with no NVML library, no driver or no GPU it
returns no GPUs and a sentence saying why. Devices are keyed by UUID; the
index is NVML's, a convenience only. Per-device figures a GPU may not
support (PCIe link, processes) are left empty, and a GPU that cannot say what
it is (lost, no permission) is left out and named in `reason`, rather than
failing the rest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Discovery", "GpuInfo", "GpuProcess", "discover", "explain"]

T = TypeVar("T")


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory: int | None  # bytes; None where the driver doesn't say


@dataclass(frozen=True)
class GpuInfo:
    uuid: str
    index: int
    name: str
    memory_total: int
    memory_used: int
    memory_free: int
    pcie_generation: int  # current link; 0 where not reported
    pcie_width: int
    pcie_max_generation: int
    pcie_max_width: int
    processes: tuple[GpuProcess, ...]


@dataclass(frozen=True)
class Discovery:
    gpus: tuple[GpuInfo, ...]
    reason: str  # why there are none, or which GPUs did not answer; empty when all did
    driver_version: str = ""


def explain(err: BaseException) -> str:
    """Why NVML could not be used, for operators."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed"
    value = getattr(err, "value", None)
    if value == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        return "no NVIDIA driver (libnvidia-ml.so.1 not found)"
    if value == pynvml.NVML_ERROR_DRIVER_NOT_LOADED:
        return "the NVIDIA driver is installed but not loaded"
    if value == pynvml.NVML_ERROR_NO_PERMISSION:
        return "no permission to use the NVIDIA driver"
    return f"NVML: {err}"


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional(fn: Callable[[], T], default: T) -> T:
    """An NVML figure a device may not support, or `default`."""
    import pynvml

    try:
        return fn()
    except pynvml.NVMLError:
        return default


def _figure(query: Callable[[Any], Any], handle: Any) -> int:
    """An integer figure of a device, 0 where it doesn't report it."""
    import pynvml

    try:
        return int(query(handle))
    except pynvml.NVMLError:
        return 0


def _processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    seen: dict[int, GpuProcess] = {}
    for query in (
        nvml.nvmlDeviceGetComputeRunningProcesses,
        nvml.nvmlDeviceGetGraphicsRunningProcesses,
    ):
        try:
            found = query(handle)
        except nvml.NVMLError:
            found = []
        for p in found:
            used = getattr(p, "usedGpuMemory", None)
            # NVML reports "not available" as a huge sentinel or None.
            if used is not None and used >= 1 << 62:
                used = None
            seen.setdefault(int(p.pid), GpuProcess(int(p.pid), used))
    return tuple(seen.values())


def _gpu(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuInfo(
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_total=int(memory.total),
        memory_used=int(memory.used),
        memory_free=int(memory.free),
        pcie_generation=_figure(nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
        pcie_width=_figure(nvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
        pcie_max_generation=_figure(nvml.nvmlDeviceGetMaxPcieLinkGeneration, handle),
        pcie_max_width=_figure(nvml.nvmlDeviceGetMaxPcieLinkWidth, handle),
        processes=_processes(nvml, handle),
    )


def discover() -> Discovery:
    try:
        import pynvml
    except ImportError:
        return Discovery((), "nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return Discovery((), explain(err))
    try:
        driver_version = _text(_optional(pynvml.nvmlSystemGetDriverVersion, ""))
        count = pynvml.nvmlDeviceGetCount()
        gpus: list[GpuInfo] = []
        silent: list[str] = []
        for index in range(count):
            # One GPU that fell off the bus (or that this user may not open)
            # must not hide the others, nor turn "auto" into the host backend.
            try:
                gpus.append(_gpu(pynvml, index))
            except pynvml.NVMLError as err:
                silent.append(f"GPU {index} did not answer ({explain(err)})")
        reason = "; ".join(silent) if count else "the NVIDIA driver reports no GPU"
        return Discovery(tuple(gpus), reason, driver_version)
    except pynvml.NVMLError as err:
        return Discovery((), explain(err))
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
