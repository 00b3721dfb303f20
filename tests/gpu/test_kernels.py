"""The custom kernels on a real GPU against their NumPy models: the slab
checksum computed in place equals the host's, and the batched gather/scatter
copies exactly what plain slicing copies, for aligned and misaligned
segments. Skipped without CuPy and a GPU (tests/gpu/run.sh runs it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")
try:
    if cp.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("no CUDA device", allow_module_level=True)
except cp.cuda.runtime.CUDARuntimeError:
    pytest.skip("no CUDA driver", allow_module_level=True)

from torpord.cuda import reference  # noqa: E402
from torpord.cuda.kernels import Kernels  # noqa: E402
from torpord.storage.checksum import CHUNK, slab_checksum  # noqa: E402


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> Kernels:
    return Kernels(Path(tmp_path_factory.mktemp("kernel-cache")))


@pytest.mark.parametrize(
    "size", [0, 1, 17, 240, 241, 1025, 4096, CHUNK - 8, CHUNK, CHUNK + 5, 5 * CHUNK + 4099]
)
def test_checksum_on_the_gpu_equals_the_hosts(kernels: Kernels, size: int) -> None:
    host = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    device = cp.asarray(host)
    assert kernels.chunk_digests(device.data.ptr, size) == reference.chunk_digests(host.tobytes())
    assert kernels.checksum(device.data.ptr, size) == slab_checksum(host.tobytes())


def test_gather_scatter_on_the_gpu_equals_the_model(kernels: Kernels) -> None:
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, 8 << 20, dtype=np.uint8)
    segments, at = [], 0
    for _ in range(1000):
        length = (
            int(rng.integers(4096, 1 << 20)) if rng.random() < 0.7 else int(rng.integers(1, 100))
        )
        at += int(rng.integers(0, 3)) * 7  # some destinations misaligned
        segments.append((int(rng.integers(0, src.size - length)), at, length))
        at += length
    expected = np.zeros(at, dtype=np.uint8)
    reference.gather_scatter(src, expected, segments)
    d_src, d_dst = cp.asarray(src), cp.zeros(at, dtype=cp.uint8)
    kernels.gather_scatter(d_src.data.ptr, d_dst.data.ptr, segments)
    cp.cuda.get_current_stream().synchronize()
    assert np.array_equal(cp.asnumpy(d_dst), expected)
