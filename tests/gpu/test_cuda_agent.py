"""The agent's CUDA side on a real GPU: a slab exported as a POSIX fd by one
process (standing in for the daemon's CUDA backend, which is the next issue),
imported and mapped at a reserved device address by another, with tensors of
every width on it, unmapped and mapped again at the same address.

Skipped without an NVIDIA GPU and cuda-bindings (tests/gpu/run.sh runs it).
On the emulated driver (tests/emulator) the tensors are CPU views of the same
addresses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
driver = pytest.importorskip("cuda.bindings.driver")
from tests import emulator  # noqa: E402

if not torch.cuda.is_available() and not emulator.active():
    pytest.skip("no CUDA device", allow_module_level=True)

from torpor.agent.cuda import _check, _context  # noqa: E402

SIZE = 3 * 2**20 + 4096  # not a multiple of the granularity: padded like the daemon's


def _export_slab(data: bytes) -> tuple[int, int]:
    """cuMemCreate a slab holding `data`, as the CUDA backend will: (fd, padded size)."""
    cu = driver
    _context(0)
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = 0
    posix_fd = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    prop.requestedHandleTypes = posix_fd
    gran = _check(
        cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        ),
        "granularity",
    )
    padded = -(-len(data) // gran) * gran
    handle = _check(cu.cuMemCreate(padded, prop, 0), "cuMemCreate")
    address = _check(cu.cuMemAddressReserve(padded, 0, 0, 0), "reserve")
    _check(cu.cuMemMap(address, padded, 0, handle, 0), "map")
    access = cu.CUmemAccessDesc()
    access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = 0
    access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    _check(cu.cuMemSetAccess(address, padded, [access], 1), "access")
    _check(cu.cuMemcpyHtoD(address, data, len(data)), "copy")
    fd = _check(
        cu.cuMemExportToShareableHandle(
            handle, cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0
        ),
        "export",
    )
    return int(fd), padded


CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from tests import emulator
    if emulator.active():  # (CPU views of the same addresses: torch here has no CUDA)
        import tests.emulator.engine
    from torpor.agent.cuda import CudaSlabRange
    fd, size = int(sys.argv[1]), int(sys.argv[2])
    r = CudaSlabRange(size, 0)
    r.map(fd)
    address = r.address
    out = {"bytes": r.tensor(0, "U8", [size]).cpu().numpy().tobytes().hex()[:64]}
    bf = r.tensor(4096, "BF16", [16, 8])
    f8 = r.tensor(8192, "F8_E4M3", [32])
    out["fp8"] = f8.view(torch.uint8).cpu().numpy().tobytes().hex()
    out["bf16"] = bf.float().sum().item()
    out["bf16_device"] = str(bf.device)
    r.unmap()
    r.map(fd)
    out["same_address"] = r.address == address
    out["again"] = r.tensor(0, "U8", [32]).cpu().numpy().tobytes().hex()
    r.release()
    print(json.dumps(out))
    """
)


def test_a_slab_maps_at_a_fixed_address_in_another_process() -> None:
    data = bytes(range(256)) * (SIZE // 256)
    fd, padded = _export_slab(data)
    try:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(fd), str(SIZE)],
            pass_fds=[fd], capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        os.close(fd)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["bytes"] == data[:32].hex()
    assert got["again"] == data[:32].hex()
    assert got["same_address"] is True
    assert got["bf16_device"] == ("cpu" if emulator.active() else "cuda:0")
    expected = torch.frombuffer(bytearray(data[4096 : 4096 + 256]), dtype=torch.bfloat16)
    assert got["bf16"] == pytest.approx(expected.float().sum().item(), nan_ok=True)
    assert got["fp8"] == data[8192 : 8192 + 32].hex()
    assert padded >= SIZE


def test_the_agent_finds_its_own_ordinal_for_the_daemons_gpu() -> None:
    from torpor.agent.cuda import ordinal_of
    from torpor.agent.mapping import MappingError
    from torpord.cuda import driver as daemon_driver

    for uuid, ordinal in daemon_driver.device_ordinals().items():
        assert ordinal_of(uuid) == ordinal
    with pytest.raises(MappingError):
        ordinal_of("GPU-00000000-0000-0000-0000-000000000000")
