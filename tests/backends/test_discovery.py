"""GPU discovery and the backend choice on a machine with no NVIDIA driver
(this one, and CI): a clear reason, the host backend for "auto", a refusal
naming the reason for "cuda". tests/gpu covers a machine with GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest
from torpord.backends.factory import BackendUnavailable, build_backend
from torpord.backends.host import HostBackend
from torpord.backends.nvml import Discovery, GpuInfo, discover, explain
from torpord.config import Config, load_config

pynvml = pytest.importorskip("pynvml")

try:
    pynvml.nvmlInit()
    pynvml.nvmlShutdown()
    pytest.skip("this machine has an NVIDIA driver", allow_module_level=True)
except pynvml.NVMLError:
    pass


def config(tmp_path: Path, kind: str) -> Config:
    path = tmp_path / "torpord.toml"
    path.write_text(
        f'version = 1\n[sources]\nallowed_roots = ["{tmp_path}"]\n[backend]\nkind = "{kind}"\n'
        '[backend.host]\ndevice_capacity = "64MiB"\n[host_pool]\ncapacity = "64MiB"\n'
    )
    return load_config(path)


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


def test_auto_uses_the_host_backend_and_says_why(tmp_path: Path) -> None:
    backend, why = build_backend(config(tmp_path, "auto"))
    try:
        assert isinstance(backend, HostBackend)
        assert why == "no GPU (no NVIDIA driver (libnvidia-ml.so.1 not found)): using host"
    finally:
        backend.close()


def test_cuda_without_a_gpu_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable) as err:
        build_backend(config(tmp_path, "cuda"))
    assert str(err.value) == (
        'backend.kind = "cuda" but no GPU is usable: no NVIDIA driver (libnvidia-ml.so.1 not found)'
    )


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
