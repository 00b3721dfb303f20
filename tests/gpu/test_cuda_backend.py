"""The CUDA backend on a real GPU: device slabs round-trip through the pinned
pool bit-exactly, checksums computed on the GPU equal the host's, device
memory really goes back to the driver when a slab is freed, the read path's
staged writes land, and an exported slab maps in another process.

Skipped without a GPU and cuda-bindings (tests/gpu/run.sh runs it). On the
emulated driver (tests/emulator; tests/e2e/test_emulated_gpu.py runs this
module so) what needs kernels is skipped and checksums are the host's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

pytest.importorskip("cuda.bindings.driver")
from torpord.cuda import driver  # noqa: E402

from tests import emulator  # noqa: E402

try:
    if not driver.device_ordinals():
        pytest.skip("no CUDA device", allow_module_level=True)
except Exception as err:  # no driver
    pytest.skip(f"no CUDA driver: {err}", allow_module_level=True)

from torpord.backends.base import SlabOwner  # noqa: E402
from torpord.backends.cuda import CudaBackend  # noqa: E402
from torpord.storage.checksum import slab_checksum  # noqa: E402
from torpord.types import Tier  # noqa: E402

MiB = 1 << 20


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CudaBackend]:
    b = CudaBackend(
        device_capacity=4 << 30,  # bytes
        host_capacity=1 << 30,
        host_chunk=256 * MiB,
        kernel_cache=Path(tmp_path_factory.mktemp("kernels")),
        kernels="auto" if emulator.active() else "required",
    )
    b.prepare()  # (as the daemon does at start)
    yield b
    b.close()


def owner(name: str) -> SlabOwner:
    return SlabOwner("m", name)


def test_slabs_round_trip_bit_exactly_over_20_cycles(backend: CudaBackend) -> None:
    device = backend.devices()[0].uuid
    size = 300 * MiB + 12345  # crosses pinned chunks, not a multiple of anything
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    (host,) = backend.allocate(Tier.HOST, None, [(size, owner("l"))])
    backend.view(host)[:] = data.tobytes()
    expected = slab_checksum(data.tobytes())
    for _ in range(20):  # sleep (D2H, free) and wake (H2D) as the mover does
        (dev,) = backend.allocate(Tier.DEVICE, device, [(size, owner("l"))])
        landed: list[int] = []
        backend.copy(host, dev, landed.append)
        assert sum(landed) == size
        assert backend.checksum(dev) == expected  # on the GPU, no copy back
        backend.free(host)
        (host,) = backend.allocate(Tier.HOST, None, [(size, owner("l"))])
        backend.copy(dev, host)
        backend.free(dev)
        assert backend.checksum(host) == expected
    assert bytes(backend.view(host)) == data.tobytes()
    backend.free(host)
    assert backend.host_pool().used == 0 and backend.devices()[0].pool.used == 0


def test_a_device_slab_reaches_the_disk_cache_through_staging(
    backend: CudaBackend, tmp_path: Path
) -> None:
    from torpord.storage.diskcache import DiskCache

    device = backend.devices()[0].uuid
    size = 70 * MiB + 7  # more than two staging buffers' worth
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    (host,) = backend.allocate(Tier.HOST, None, [(size, owner("l"))])
    (dev,) = backend.allocate(Tier.DEVICE, device, [(size, owner("l"))])
    try:
        backend.view(host)[:] = data
        backend.copy(host, dev)
        cache = DiskCache(tmp_path / "cache", 1 << 30)
        share = cache.reserve([size], set())
        pieces = backend.read_out(dev)
        try:
            entry = cache.write("ab" * 16, pieces, slab_checksum(data), share, size)
        finally:
            pieces.close()
        (back,) = backend.allocate(Tier.DEVICE, device, [(size, owner("l"))])
        try:
            cache.read_into(entry, backend.sink(back), "l")  # (checks the checksum)
            assert backend.checksum(back) == slab_checksum(data)
        finally:
            backend.free(back)
    finally:
        backend.free(dev)
        backend.free(host)


def test_freed_device_memory_goes_back_to_the_driver(backend: CudaBackend) -> None:
    info = backend.devices()[0]
    ordinal = info.index
    before, _ = driver.mem_info(ordinal)
    slabs = backend.allocate(
        Tier.DEVICE, info.uuid, [(512 * MiB, owner(f"x{i}")) for i in range(4)]
    )
    during, _ = driver.mem_info(ordinal)
    assert before - during >= 4 * 512 * MiB
    for slab in slabs:
        backend.free(slab)
    backend.drain()
    after, _ = driver.mem_info(ordinal)
    assert after >= before - 64 * MiB  # back, give or take the driver's own


def test_the_read_path_stages_writes_into_a_device_slab(backend: CudaBackend) -> None:
    device = backend.devices()[0].uuid
    size = 100 * MiB + 7
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    (dev,) = backend.allocate(Tier.DEVICE, device, [(size, owner("r"))])
    sink = backend.sink(dev)
    assert sink.view() is None
    view = memoryview(data)
    for at in range(0, size, 48 * MiB):  # the pipeline writes pieces, any order
        sink.write(at, view[at : at + 48 * MiB])
    assert sink.checksum() == slab_checksum(data)
    backend.free(dev)


CHILD = textwrap.dedent(
    """
    import sys, torch
    from tests import emulator
    if emulator.active():  # (CPU views of the same addresses: torch here has no CUDA)
        import tests.emulator.engine
    from torpor.agent.cuda import CudaSlabRange
    fd, size, ordinal = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    r = CudaSlabRange(size, ordinal)
    r.map(fd)
    print(r.tensor(0, "U8", [64]).cpu().numpy().tobytes().hex())
    r.release()
    """
)


def test_an_exported_slab_maps_in_another_process(backend: CudaBackend) -> None:
    info = backend.devices()[0]
    size = 8 * MiB
    data = os.urandom(size)
    (host,) = backend.allocate(Tier.HOST, None, [(size, owner("e"))])
    backend.view(host)[:] = data
    (dev,) = backend.allocate(Tier.DEVICE, info.uuid, [(size, owner("e"))])
    backend.copy(host, dev)
    fd = backend.export(dev)
    try:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(fd), str(size), str(info.index)],
            pass_fds=(fd,),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.close(fd)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == data[:64].hex()
    backend.free(dev)
    backend.free(host)


@pytest.mark.parametrize("path", ["copies", "kernel", "batch", "measured"])
def test_the_read_pipeline_loads_device_slabs_through_pinned_staging(
    backend: CudaBackend, tmp_path: Path, path: str
) -> None:
    # A chunk's pieces go to a slab by the copy engine, the gather/scatter
    # kernel, the driver's batched copy, or whichever the measurement on this
    # GPU chose.
    if path in ("kernel", "measured") and backend.kernels_unavailable:
        pytest.skip(f"no kernels here: {backend.kernels_unavailable}")
    dev = backend.device(backend.devices()[0].uuid)
    dev.methods.measured = None if path == "measured" else [(1 << 40, path)]
    from torpor.testing import make_checkpoint
    from torpord.storage.checkpoint import open_checkpoint
    from torpord.storage.layers import plan_layers
    from torpord.storage.pipeline import ReadOptions, read_layers

    ckpt = open_checkpoint(make_checkpoint(tmp_path / "m", layers=4, hidden=512, shards=2))
    plans = plan_layers(ckpt)
    device = backend.devices()[0].uuid
    slabs = backend.allocate(Tier.DEVICE, device, [(p.size, owner(p.name)) for p in plans])
    hosts = backend.allocate(Tier.HOST, None, [(p.size, owner(p.name)) for p in plans])
    try:
        for direct in ("auto", "on"):
            digests: dict[int, str] = {}
            read_layers(
                ckpt,
                plans,
                [backend.sink(s) for s in slabs],
                ReadOptions(chunk_bytes=1 << 20, threads=4, direct=direct),
                on_layer=digests.setdefault,
                staging=backend.staging(),
            )
            read_layers(ckpt, plans, [backend.sink(h) for h in hosts], ReadOptions())
            for i, (slab, host) in enumerate(zip(slabs, hosts, strict=True)):
                assert digests[i] == backend.checksum(host) == backend.checksum(slab), direct
        assert not backend.staging().pinned()  # every staging buffer unpinned
        if path == "measured":
            assert dev.methods.measured  # measured, logged
        else:  # (a method that failed would have been replaced by copies)
            assert dev.methods.measured == [(1 << 40, path)]
    finally:
        for slab in [*slabs, *hosts]:
            backend.free(slab)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from torpor.agent.cuda import CudaSlabRange
    fd, size, ordinal = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    r = CudaSlabRange(size, ordinal)
    r.map(fd)
    print("mapped", flush=True)
    time.sleep(600)  # a hung engine: never lets go
    """
)


def test_a_process_that_still_maps_a_freed_slab_keeps_its_memory(
    backend: CudaBackend,
) -> None:
    """Why the CUDA backend counts a gone engine's slabs as held: freeing them
    in the daemon returns nothing to the driver while another process maps
    them; the memory comes back when that process exits."""
    info = backend.devices()[0]
    size = 1 << 30
    (dev,) = backend.allocate(Tier.DEVICE, info.uuid, [(size, owner("h"))])
    fd = backend.export(dev)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(fd), str(size), str(info.index)],
        pass_fds=(fd,),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        os.close(fd)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "mapped"
        before, _ = driver.mem_info(info.index)
        backend.held_by(dev, holder.pid, "a")
        backend.free(dev)
        backend.drain()
        after_free, _ = driver.mem_info(info.index)
        assert after_free - before < size // 2  # not back: the holder maps it
        assert backend.devices()[0].pool.held >= size  # and the pool says so
        holder.kill()
        holder.wait(60)
        deadline = time.monotonic() + 30
        while driver.mem_info(info.index)[0] - before < size - 64 * MiB:
            assert time.monotonic() < deadline, "the memory never came back"
            time.sleep(0.1)
        assert backend.exited(holder.pid) >= size
        assert backend.devices()[0].pool.held == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(60)
        if holder.stdout is not None:
            holder.stdout.close()
