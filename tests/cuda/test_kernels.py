"""The CUDA kernels without a GPU: their NumPy models against the xxhash
library and plain slicing, the host's checksum against the kernel's model,
and every kernel source compiled for sm_80 and sm_90 (nvcc, and NVRTC as
CuPy's RawModule will at run time)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import xxhash
from torpord.cuda import kernels, reference
from torpord.storage.checksum import CHUNK, slab_checksum

# Where the sources are kept: the repository's top level.
SOURCES = Path(__file__).resolve().parents[2] / "cuda_kernels"

LENGTHS = [
    *range(0, 260),  # every short path, and the first long ones
    *(1024 * k + d for k in (1, 2, 16) for d in (-65, -64, -1, 0, 1, 63, 64, 65)),
    65536 + 7,
    CHUNK,
    CHUNK + 3,
]


def test_the_checksum_kernels_model_is_xxh3_64() -> None:
    rng = np.random.default_rng(1)
    for n in LENGTHS:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert reference.xxh3_64(data) == xxhash.xxh3_64_intdigest(data), n


@pytest.mark.parametrize("size", [0, 1, 240, 241, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 4099])
def test_the_host_checksum_matches_the_kernels_definition(size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert slab_checksum(data) == reference.slab_checksum(data)
    digests = reference.chunk_digests(data)
    assert len(digests) == -(-size // CHUNK)
    if size:  # one flipped bit anywhere changes it
        flipped = bytearray(data)
        flipped[size // 2] ^= 0x04
        assert slab_checksum(flipped) != slab_checksum(data)


def test_gather_scatter_model_copies_every_segment_and_nothing_else() -> None:
    rng = np.random.default_rng(7)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    for base in [(0, 0), (3, 0), (0, 5), (16, 32), (7, 7)]:
        segments, at = [], 0
        for _ in range(300):
            length = int(rng.choice([1, 15, 16, 17, 100, 4096, 70_000, 200_000]))
            at += int(rng.integers(0, 40))
            if at + length > src.size:
                break
            segments.append((int(rng.integers(0, src.size - length)), at, length))
            at += length
        dst = np.zeros(at + 64, dtype=np.uint8)
        expected = dst.copy()
        for s, d, n in segments:
            expected[d : d + n] = src[s : s + n]
        reference.gather_scatter(src, dst, segments, base)
        assert np.array_equal(dst, expected), base


def test_gather_scatter_pieces_split_segments_exactly() -> None:
    segments = [(0, 0, 3 * reference.PIECE + 5), (10, 1 << 20, 1), (5, 2 << 20, 0)]
    work = reference.pieces(segments)
    assert all(0 < n <= reference.PIECE for _, _, n in work)
    assert sum(n for _, _, n in work) == 3 * reference.PIECE + 6
    for src, dst, length in [(3, 5, 100), (5, 5, 100), (0, 0, 10), (17, 1, 64), (1, 17, 8)]:
        head, words, tail = reference.piece_parts(src, dst, length)
        assert head + 16 * words + tail == length
        if words:  # the wide body only where both ends are 16-byte aligned
            assert (dst + head) % 16 == 0 and (src + head) % 16 == 0


def test_the_kernels_module_imports_without_cupy_or_a_gpu() -> None:
    assert set(kernels.KERNELS) == {p.name for p in SOURCES.glob("*.cu")}
    assert kernels.sources_dir() == SOURCES  # what a source checkout compiles
    for name in kernels.KERNELS:
        for kernel in kernels.KERNELS[name]:
            assert f"torpor_{kernel.removeprefix('torpor_')}(" in kernels.source(name)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_every_kernel_compiles_with_nvcc(name: str, arch: str, tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    out = subprocess.run(
        [
            nvcc,
            f"-arch={arch}",
            "-cubin",
            "-Werror",
            "all-warnings",
            "-o",
            str(tmp_path / "k.cubin"),
            str(SOURCES / name),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "k.cubin").stat().st_size > 0


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_every_kernel_compiles_with_nvrtc(name: str, arch: str) -> None:
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    try:
        err, program = nvrtc.nvrtcCreateProgram(
            kernels.source(name).encode(), name.encode(), 0, [], []
        )
    except RuntimeError as exc:  # no libnvrtc on this machine
        pytest.skip(f"NVRTC is not available: {exc}")
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    options = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in kernels.OPTIONS)]
    (err,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
    _, size = nvrtc.nvrtcGetProgramLogSize(program)
    # A fresh, mutable buffer: the call writes into it (b" " * 1 would be
    # Python's shared one-byte object, overwritten for the whole process).
    log = bytearray(size)
    nvrtc.nvrtcGetProgramLog(program, log)
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")
    _, cubin = nvrtc.nvrtcGetCUBINSize(program)
    assert cubin > 0
    nvrtc.nvrtcDestroyProgram(program)


def test_the_cuda_backend_imports_anywhere_and_says_why_it_cannot_start() -> None:
    pytest.importorskip("cuda.bindings.driver")
    from torpord.backends.cuda import CudaBackend
    from torpord.cuda import driver
    from torpord.errors import Unavailable

    try:
        driver.init()
    except Unavailable:
        pass
    else:
        pytest.skip("this machine has an NVIDIA driver")
    with pytest.raises(Unavailable) as err:
        CudaBackend(host_capacity=1 << 20)
    assert err.value.reason == "CUDA_UNAVAILABLE" and "NVIDIA driver" in err.value.message
