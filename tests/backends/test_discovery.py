"""GPU discovery and the backend choice on a machine with no NVIDIA driver
(this one, and CI): a clear reason, the host backend for "auto", a refusal
naming the reason for "cuda". tests/gpu covers a machine with GPUs; here the
driver's answers on one are played by pynvml's own functions, replaced (the
library's, not ours: discover() runs unchanged)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from torpord.backends.factory import BackendUnavailable, build_backend
from torpord.backends.host import HostBackend
from torpord.backends.nvml import Discovery, GpuInfo, GpuProcess, discover, explain
from torpord.config import Config, load_config

pynvml = pytest.importorskip("pynvml")


def _has_driver() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


no_driver = pytest.mark.skipif(_has_driver(), reason="this machine has an NVIDIA driver")


def config(tmp_path: Path, kind: str) -> Config:
    path = tmp_path / "torpord.toml"
    path.write_text(
        f'version = 1\n[sources]\nallowed_roots = ["{tmp_path}"]\n[backend]\nkind = "{kind}"\n'
        '[backend.host]\ndevice_capacity = "64MiB"\n[host_pool]\ncapacity = "64MiB"\n'
    )
    return load_config(path)


@no_driver
def test_no_driver_means_no_gpus_and_says_why() -> None:
    found = discover()
    assert found.gpus == ()
    assert found.reason == "no NVIDIA driver (libnvidia-ml.so.1 not found)"


def test_each_nvml_failure_reads_as_a_sentence() -> None:
    def err(code: int) -> BaseException:
        return pynvml.NVMLError(code)

    assert "not loaded" in explain(err(pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    assert "permission" in explain(err(pynvml.NVML_ERROR_NO_PERMISSION))
    assert explain(err(pynvml.NVML_ERROR_UNKNOWN)).startswith("NVML: ")


@no_driver
def test_auto_uses_the_host_backend_and_says_why(tmp_path: Path) -> None:
    backend, why = build_backend(config(tmp_path, "auto"))
    try:
        assert isinstance(backend, HostBackend)
        assert why == "no GPU (no NVIDIA driver (libnvidia-ml.so.1 not found)): using host"
    finally:
        backend.close()


@no_driver
def test_cuda_without_a_gpu_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable) as err:
        build_backend(config(tmp_path, "cuda"))
    assert str(err.value) == (
        'backend.kind = "cuda" but no GPU is usable: no NVIDIA driver (libnvidia-ml.so.1 not found)'
    )


@no_driver
def test_gpus_the_cuda_backend_cannot_start_on_fall_back_to_host(tmp_path: Path) -> None:
    # What a GPU node whose CUDA libraries are broken sees: NVML answers, the
    # driver API does not (here: no libcuda at all).
    gpu = GpuInfo("GPU-0", 0, "Some GPU", 1, 0, 1, 4, 16, 4, 16, ())
    found = Discovery((gpu,), "")
    backend, why = build_backend(config(tmp_path, "auto"), found)
    try:
        assert isinstance(backend, HostBackend)
        assert why.startswith("1 GPU(s) found (Some GPU) but the CUDA backend could not start:")
        assert why.endswith("; using host")
    finally:
        backend.close()
    with pytest.raises(BackendUnavailable) as refused:
        build_backend(config(tmp_path, "cuda"), found)
    assert "the CUDA backend could not start on 1 GPU(s) (Some GPU)" in str(refused.value)


# -- a driver with GPUs, played by pynvml's functions --------------------------

NOT_AVAILABLE = (1 << 64) - 1  # NVML's "not available" for a process's memory


class Driver:
    """What NVML answers on a node: `gpus` by index, each a dict of figures;
    a figure that is an exception is raised when asked for."""

    def __init__(self, gpus: list[dict[str, Any]]) -> None:
        self.gpus = gpus
        self.shut = False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def ask(key: str) -> Any:
            def query(handle: int) -> Any:
                value = self.gpus[handle][key]
                if isinstance(value, BaseException):
                    raise value
                return value

            return query

        def handle(index: int) -> int:
            if isinstance(self.gpus[index].get("handle"), BaseException):
                raise self.gpus[index]["handle"]
            return index

        def shutdown() -> None:
            self.shut = True

        for name, fn in {
            "nvmlInit": lambda: None,
            "nvmlShutdown": shutdown,
            "nvmlSystemGetDriverVersion": lambda: b"570.86.15",
            "nvmlDeviceGetCount": lambda: len(self.gpus),
            "nvmlDeviceGetHandleByIndex": handle,
            "nvmlDeviceGetUUID": ask("uuid"),
            "nvmlDeviceGetName": ask("name"),
            "nvmlDeviceGetMemoryInfo": ask("memory"),
            "nvmlDeviceGetCurrPcieLinkGeneration": ask("gen"),
            "nvmlDeviceGetCurrPcieLinkWidth": ask("width"),
            "nvmlDeviceGetMaxPcieLinkGeneration": ask("max_gen"),
            "nvmlDeviceGetMaxPcieLinkWidth": ask("max_width"),
            "nvmlDeviceGetComputeRunningProcesses": ask("compute"),
            "nvmlDeviceGetGraphicsRunningProcesses": ask("graphics"),
        }.items():
            monkeypatch.setattr(pynvml, name, fn)


def gpu(index: int, **figures: Any) -> dict[str, Any]:
    gib = 1 << 30
    base: dict[str, Any] = {
        "uuid": f"GPU-{index:08x}-0000-0000-0000-000000000000",
        "name": "NVIDIA H200",
        "memory": SimpleNamespace(total=141 * gib, used=gib, free=140 * gib),
        "gen": 5,
        "width": 16,
        "max_gen": 5,
        "max_width": 16,
        "compute": [],
        "graphics": [],
    }
    return base | figures


def process(pid: int, used: int | None) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, usedGpuMemory=used)


def test_gpus_are_listed_by_uuid_with_their_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = Driver(
        [
            gpu(0, name=b"NVIDIA H200", compute=[process(41, 3 << 30)], graphics=[process(7, 0)]),
            gpu(1, uuid=b"GPU-bytes", compute=[process(41, 1 << 30), process(42, NOT_AVAILABLE)]),
            gpu(2, graphics=[process(43, None)]),  # newer pynvml: None for "not available"
        ]
    )
    driver.install(monkeypatch)
    found = discover()
    assert found.reason == "" and found.driver_version == "570.86.15" and driver.shut
    first, second, third = found.gpus
    assert (first.uuid, first.index, first.name) == (
        "GPU-00000000-0000-0000-0000-000000000000",
        0,
        "NVIDIA H200",
    )
    assert (first.memory_total, first.memory_used, first.memory_free) == (
        141 << 30,
        1 << 30,
        140 << 30,
    )
    assert (first.pcie_generation, first.pcie_width) == (5, 16)
    assert first.processes == (GpuProcess(41, 3 << 30), GpuProcess(7, 0))
    assert second.uuid == "GPU-bytes"
    assert second.processes == (GpuProcess(41, 1 << 30), GpuProcess(42, None))
    assert third.processes == (GpuProcess(43, None),)


def test_figures_a_gpu_does_not_report_are_left_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(code: int) -> BaseException:
        return pynvml.NVMLError(code)

    Driver(
        [
            gpu(
                0,
                gen=refused(pynvml.NVML_ERROR_NOT_SUPPORTED),
                width=refused(pynvml.NVML_ERROR_NOT_SUPPORTED),
                max_gen=refused(pynvml.NVML_ERROR_NO_PERMISSION),
                max_width=refused(pynvml.NVML_ERROR_NO_PERMISSION),
                compute=refused(pynvml.NVML_ERROR_NO_PERMISSION),
                graphics=refused(pynvml.NVML_ERROR_NOT_SUPPORTED),
            )
        ]
    ).install(monkeypatch)
    found = discover()
    assert found.reason == ""
    (only,) = found.gpus
    assert (only.pcie_generation, only.pcie_width, only.pcie_max_generation) == (0, 0, 0)
    assert only.pcie_max_width == 0 and only.processes == ()


def test_a_gpu_that_does_not_answer_is_named_and_the_others_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lost = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    driver = Driver([gpu(0), gpu(1, handle=lost), gpu(2, memory=lost)])
    driver.install(monkeypatch)
    found = discover()
    assert [g.index for g in found.gpus] == [0] and driver.shut
    assert found.reason == (
        f"GPU 1 did not answer (NVML: {lost}); GPU 2 did not answer (NVML: {lost})"
    )


def test_a_driver_without_gpus_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    Driver([]).install(monkeypatch)
    assert discover() == Discovery((), "the NVIDIA driver reports no GPU", "570.86.15")
