"""The CUDA backend on emulated GPUs (tests/emulator) where tests/gpu has no
case: two GPUs, with and without peer access, and a driver that runs out of
memory because another process holds it. Each case is a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests import emulator

emulator.require()

MiB = 1 << 20

TWO_GPUS = textwrap.dedent(
    """
    import json, os
    from torpord.backends.base import SlabOwner
    from torpord.backends.cuda import CudaBackend
    from torpord.types import Tier
    from torpord.cuda import driver

    backend = CudaBackend(device_capacity=256 << 20, host_capacity=64 << 20, host_chunk=16 << 20)
    backend.prepare()
    a, b = (info.uuid for info in backend.devices())
    size = 40 * 2**20 + 12345  # more than one staging buffer
    data = os.urandom(size)
    (host,) = backend.allocate(Tier.HOST, None, [(size, SlabOwner("m", "h"))])
    backend.view(host)[:] = data
    (on_a,) = backend.allocate(Tier.DEVICE, a, [(size, SlabOwner("m", "a"))])
    (on_b,) = backend.allocate(Tier.DEVICE, b, [(size, SlabOwner("m", "b"))])
    landed = []
    backend.copy(host, on_a)
    backend.copy(on_a, on_b, landed.append)
    out = {
        "landed": sum(landed),
        "same": b"".join(bytes(p) for p in backend.read_out(on_b)) == data,
        "driver_used": [driver.mem_info(i)[1] - driver.mem_info(i)[0] for i in (0, 1)],
    }
    for slab in (on_a, on_b, host):
        backend.free(slab)
    out["pools"] = [d.pool.used for d in backend.devices()] + [backend.host_pool().used]
    out["driver_after"] = [driver.mem_info(i)[1] - driver.mem_info(i)[0] for i in (0, 1)]
    backend.close()
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return emulator.build(tmp_path_factory.getbasetemp() / "emulator")


def run(libraries: Path, script: str, node: str, **env: str) -> dict[str, Any]:
    environ = emulator.environment(libraries, node=f"{node}{os.getpid()}", devices=2)
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("peer", ["0", "1"])
def test_a_slab_moves_between_gpus_with_or_without_peer_access(libraries: Path, peer: str) -> None:
    # Without peer access through the destination's pinned staging; with it,
    # device to device, the source's window opened to the destination GPU.
    got = run(libraries, TWO_GPUS, f"peer{peer}x", CUDAEMU_PEER=peer)
    size = 40 * MiB + 12345
    assert got["landed"] == size
    assert got["same"] is True
    padded = -(-size // (2 * MiB)) * 2 * MiB
    assert got["driver_used"] == [padded, padded]
    assert got["pools"] == [0, 0, 0]
    assert got["driver_after"] == [0, 0]


HOLDER = textwrap.dedent(
    """
    import sys, time
    from cuda.bindings import driver as d
    d.cuInit(0)
    prop = d.CUmemAllocationProp()
    prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = 0
    err, handle = d.cuMemCreate(48 << 20, prop, 0)
    assert err == 0, err
    print("holding", flush=True)
    time.sleep(120)
    """
)

OUT_OF_MEMORY = textwrap.dedent(
    """
    import json
    from torpord.backends.base import SlabOwner
    from torpord.backends.cuda import CudaBackend
    from torpord.types import Tier
    from torpord.errors import TorporError

    backend = CudaBackend(device_capacity=64 << 20, host_capacity=8 << 20, host_chunk=8 << 20)
    (device,) = backend.devices()
    out = {}
    try:
        asks = [(8 << 20, SlabOwner("m", f"l{i}")) for i in range(4)]
        backend.allocate(Tier.DEVICE, device.uuid, asks)
    except TorporError as err:
        out = {"code": err.code.name, "reason": err.reason, "message": err.message,
               "metadata": dict(err.metadata)}
    out["used_after"] = backend.devices()[0].pool.used
    backend.close()
    print(json.dumps(out))
    """
)


def test_a_driver_out_of_memory_names_what_it_has_free_and_takes_nothing(
    libraries: Path,
) -> None:
    node = f"oom{os.getpid()}"
    env = emulator.environment(libraries, node=node, memory=64 * MiB)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        out = subprocess.run(
            [sys.executable, "-c", OUT_OF_MEMORY], env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # The budget (64 MiB) admits 32 MiB; the driver has 16 MiB free: two of the
    # four 8 MiB slabs are made, the third finds none left, and all are given back.
    assert got["code"] == "RESOURCE_EXHAUSTED" and got["reason"] == "OUT_OF_MEMORY"
    assert f"the driver has 0 of {64 * MiB} bytes free, {8 * MiB} asked" in got["message"]
    assert got["metadata"]["driver_free"] == "0"
    assert got["used_after"] == 0


CHUNKS = textwrap.dedent(
    """
    import json, os, sys
    from torpord.backends.base import SlabOwner
    from torpord.backends.cuda import CudaBackend
    from torpord.types import Tier
    from torpord.cuda import driver
    from torpord.storage.checksum import slab_checksum

    def maps():
        return sum("cudaemu" in line for line in open("/proc/self/maps"))

    backend = CudaBackend(device_capacity=256 << 20, host_capacity=8 << 20, host_chunk=8 << 20)
    backend.prepare()
    (device,) = (info.uuid for info in backend.devices())
    size = 20 << 20
    data = os.urandom(size)
    staging = backend.staging()
    buffer = staging.take(1 << 20)
    out = {}
    for name, finish in (("whole", True), ("cut short", False)):
        (slab,) = backend.allocate(Tier.DEVICE, device, [(size, SlabOwner("m", name))])
        sink = backend.sink(slab)
        print("--- writes", flush=True, file=sys.stderr)
        for at in range(0, size, 1 << 20):  # a chunk at a time, as the read pipeline
            memoryview(buffer)[:] = data[at : at + (1 << 20)]
            with memoryview(buffer) as view:
                sink.write_many([(at + o, view[o : o + 65536]) for o in range(0, 1 << 20, 65536)])
        out[name] = {"mapped_while_writing": maps()}
        if finish:
            out[name]["checksum"] = sink.checksum() == slab_checksum(data)
            out[name]["mapped_after"] = maps()
        print("--- free", flush=True, file=sys.stderr)
        backend.free(slab)
        out[name]["mapped_after_free"] = maps()
        out[name]["driver_used"] = driver.mem_info(0)[1] - driver.mem_info(0)[0]
    staging.give(buffer)
    backend.close()
    print(json.dumps(out))
    """
)


def test_the_read_path_maps_a_layer_once_and_never_leaves_it_mapped(libraries: Path) -> None:
    environ = emulator.environment(libraries, node=f"chunks{os.getpid()}")
    environ["CUDAEMU_TRACE"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", CHUNKS], env=environ, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # Twenty chunks of sixteen pieces each, one mapping (cuMemMap also makes
    # the device's own view of it here: two lines in /proc/self/maps).
    writes = [part.split("--- free")[0] for part in out.stderr.split("--- writes")[1:]]
    assert [w.count(": cuMemMap\n") for w in writes] == [1, 1]
    assert got["whole"] == {
        "mapped_while_writing": 2,
        "checksum": True,
        "mapped_after": 0,
        "mapped_after_free": 0,
        "driver_used": 0,
    }
    # A load cut short (no checksum): the window goes with the slab.
    assert got["cut short"] == {
        "mapped_while_writing": 2,
        "mapped_after_free": 0,
        "driver_used": 0,
    }
