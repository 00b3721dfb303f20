"""Discovery on a machine with GPUs: NVML lists them by UUID with sane
figures, and the UUIDs are the ones the CUDA driver API reports (the backend
addresses devices by them)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

pynvml = pytest.importorskip("pynvml")
from torpord.backends.nvml import discover  # noqa: E402

found = discover()
if not found.gpus:
    pytest.skip(f"no GPU: {found.reason}", allow_module_level=True)


def test_every_gpu_has_a_uuid_and_sane_figures() -> None:
    assert found.reason == "" and found.driver_version
    for gpu in found.gpus:
        assert gpu.uuid.startswith("GPU-") and gpu.name
        assert gpu.memory_total > 0 and gpu.memory_used + gpu.memory_free <= gpu.memory_total * 1.01
        assert gpu.pcie_max_width >= gpu.pcie_width >= 0


def test_nvml_and_the_cuda_driver_agree_on_uuids() -> None:
    pytest.importorskip("cuda.bindings.driver")
    from torpord.cuda import driver

    assert set(driver.device_ordinals()) <= {g.uuid for g in found.gpus}
