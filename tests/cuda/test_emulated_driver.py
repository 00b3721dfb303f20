"""The emulated driver (tests/emulator) refuses what the CUDA documentation
forbids, faults where a GPU would, and frees memory when a GPU would: the
emulated tests are only as good as that. Each case runs in a process of its
own on a node of its own, through cuda-bindings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests import emulator

emulator.require()

MiB = 1 << 20

PRELUDE = textwrap.dedent(
    """
    import json, os, sys, ctypes
    from cuda.bindings import driver as d

    def name(err):
        return d.cuGetErrorName(err)[1].decode()

    def ok(result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        assert err == d.CUresult.CUDA_SUCCESS, name(err)
        return rest[0] if len(rest) == 1 else rest

    ok(d.cuInit(0))
    ctx = ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0))))
    prop = d.CUmemAllocationProp()
    prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = 0
    prop.requestedHandleTypes = (
        d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    )
    G = 2 << 20

    def access(address, length):
        desc = d.CUmemAccessDesc()
        desc.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = 0
        desc.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        return d.cuMemSetAccess(address, length, [desc], 1)

    def mapped(length):
        handle = ok(d.cuMemCreate(length, prop, 0))
        address = ok(d.cuMemAddressReserve(length, 0, 0, 0))
        ok(d.cuMemMap(address, length, 0, handle, 0))
        ok(access(address, length))
        return handle, int(address)

    out = {}
    """
)


@pytest.fixture(scope="module")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return emulator.build(tmp_path_factory.getbasetemp() / "emulator")


def run(libraries: Path, script: str, **env: str) -> dict[str, Any]:
    node = f"t{os.getpid()}{abs(hash(script)) % 10**6}"
    environ = emulator.environment(libraries, node=node, memory=64 * MiB)
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script) + "\nprint(json.dumps(out))"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["stderr"] = out.stderr
    return result


def test_what_the_documentation_forbids_is_refused(libraries: Path) -> None:
    got = run(
        libraries,
        """
        handle = ok(d.cuMemCreate(2 * G, prop, 0))
        address = ok(d.cuMemAddressReserve(2 * G, 0, 0, 0))
        out["unaligned_create"] = name(d.cuMemCreate(G + 4096, prop, 0)[0])
        out["offset_map"] = name(d.cuMemMap(int(address) + G, G, G, handle, 0)[0])
        out["part_map"] = name(d.cuMemMap(address, G, 0, handle, 0)[0])
        out["access_unmapped"] = name(access(address, 2 * G)[0])
        ok(d.cuMemMap(address, 2 * G, 0, handle, 0))
        out["unmap_part"] = name(d.cuMemUnmap(address, G)[0])
        out["free_mapped"] = name(d.cuMemAddressFree(address, 2 * G)[0])
        ok(access(address, 2 * G))
        ok(d.cuMemUnmap(address, 2 * G))
        ok(d.cuMemAddressFree(address, 2 * G))
        ok(d.cuMemRelease(handle))
        out["released_twice"] = name(d.cuMemRelease(handle)[0])
        out["no_context"] = name(d.cuStreamCreate(0)[0])
        ok(d.cuCtxSetCurrent(ctx))
        buf = ctypes.create_string_buffer(4096)
        at = ctypes.addressof(buf)
        ok(d.cuMemHostRegister(at, 4096, 0))
        out["registered_twice"] = name(d.cuMemHostRegister(at, 4096, 0)[0])
        ok(d.cuMemHostUnregister(at))
        out["unregistered_twice"] = name(d.cuMemHostUnregister(at)[0])
        out["too_much"] = name(d.cuMemCreate(64 * G, prop, 0)[0])
        """,
    )
    assert got["unaligned_create"] == "CUDA_ERROR_INVALID_VALUE"
    assert got["offset_map"] == "CUDA_ERROR_INVALID_VALUE"  # "offset ... must be zero"
    assert got["part_map"] == "CUDA_ERROR_INVALID_VALUE"
    assert got["access_unmapped"] == "CUDA_ERROR_INVALID_VALUE"
    assert got["unmap_part"] == "CUDA_ERROR_INVALID_VALUE"
    assert got["free_mapped"] == "CUDA_ERROR_INVALID_VALUE"
    assert got["released_twice"] == "CUDA_ERROR_INVALID_VALUE"
    assert got["no_context"] == "CUDA_ERROR_INVALID_CONTEXT"
    assert got["registered_twice"] == "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"
    assert got["unregistered_twice"] == "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED"
    assert got["too_much"] == "CUDA_ERROR_OUT_OF_MEMORY"


def test_copies_run_in_stream_order_after_the_call_and_events_say_when(
    libraries: Path,
) -> None:
    got = run(
        libraries,
        """
        ok(d.cuCtxSetCurrent(ctx))
        handle, address = mapped(G)
        stream = ok(d.cuStreamCreate(1))
        src = ctypes.create_string_buffer(b"x" * 4096, 4096)
        back = ctypes.create_string_buffer(4096)
        ok(d.cuMemcpyHtoDAsync(address, ctypes.addressof(src), 4096, stream))
        ok(d.cuMemcpyDtoHAsync(ctypes.addressof(back), address, 4096, stream))
        event = ok(d.cuEventCreate(0))
        ok(d.cuEventRecord(event, stream))
        out["queued"] = name(d.cuEventQuery(event)[0])
        out["back_before"] = back.raw[:4].decode(errors="replace")
        ok(d.cuEventSynchronize(event))
        out["done"] = name(d.cuEventQuery(event)[0])
        out["back_after"] = back.raw[:4].decode()
        """,
        CUDAEMU_DELAY_US="200000",
    )
    assert got["queued"] == "CUDA_ERROR_NOT_READY"
    assert got["back_before"] == "\0\0\0\0"
    assert got["done"] == "CUDA_SUCCESS"
    assert got["back_after"] == "xxxx"


def test_unmapping_memory_with_copies_queued_is_a_sticky_fault(libraries: Path) -> None:
    got = run(
        libraries,
        """
        ok(d.cuCtxSetCurrent(ctx))
        handle, address = mapped(G)
        stream = ok(d.cuStreamCreate(1))
        src = ctypes.create_string_buffer(4096)
        ok(d.cuMemcpyHtoDAsync(address, ctypes.addressof(src), 4096, stream))
        out["unmap"] = name(d.cuMemUnmap(address, G)[0])
        out["after"] = name(d.cuStreamSynchronize(stream)[0])
        """,
        CUDAEMU_DELAY_US="200000",
    )
    assert got["unmap"] == got["after"] == "CUDA_ERROR_ILLEGAL_ADDRESS"
    assert "FAULT" in got["stderr"] and "still queued" in got["stderr"]


def test_a_copy_to_memory_without_access_faults(libraries: Path) -> None:
    got = run(
        libraries,
        """
        ok(d.cuCtxSetCurrent(ctx))
        handle = ok(d.cuMemCreate(G, prop, 0))
        address = ok(d.cuMemAddressReserve(G, 0, 0, 0))
        ok(d.cuMemMap(address, G, 0, handle, 0))  # (no cuMemSetAccess)
        stream = ok(d.cuStreamCreate(1))
        src = ctypes.create_string_buffer(4096)
        ok(d.cuMemcpyHtoDAsync(address, ctypes.addressof(src), 4096, stream))
        out["sync"] = name(d.cuStreamSynchronize(stream)[0])
        out["later"] = name(d.cuStreamCreate(1)[0])
        """,
    )
    assert got["sync"] == got["later"] == "CUDA_ERROR_ILLEGAL_ADDRESS"
    assert "without that device's access" in got["stderr"]


def test_memory_returns_when_no_process_holds_or_maps_it(libraries: Path) -> None:
    got = run(
        libraries,
        """
        ok(d.cuCtxSetCurrent(ctx))
        free0, total = ok(d.cuMemGetInfo())
        handle, address = mapped(4 * G)
        fd = ok(d.cuMemExportToShareableHandle(
            handle, d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0))
        out["inheritable"] = os.get_inheritable(fd)
        out["created"] = free0 - ok(d.cuMemGetInfo())[0]
        ok(d.cuMemUnmap(address, 4 * G))
        ok(d.cuMemRelease(handle))
        out["exported_fd_keeps_it"] = free0 - ok(d.cuMemGetInfo())[0]
        other = ok(d.cuMemImportFromShareableHandle(
            fd, d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR))
        os.close(fd)
        out["imported_keeps_it"] = free0 - ok(d.cuMemGetInfo())[0]
        ok(d.cuMemMap(address, 4 * G, 0, other, 0))
        ok(d.cuMemRelease(other))
        out["mapping_keeps_it"] = free0 - ok(d.cuMemGetInfo())[0]
        ok(d.cuMemUnmap(address, 4 * G))
        out["gone"] = free0 - ok(d.cuMemGetInfo())[0]
        out["total"] = total
        """,
    )
    size = 4 * 2 * MiB
    assert got["total"] == 64 * MiB
    assert got["inheritable"] is True  # (the driver's fd: the daemon sets close-on-exec)
    assert got["created"] == got["exported_fd_keeps_it"] == size
    assert got["imported_keeps_it"] == got["mapping_keeps_it"] == size
    assert got["gone"] == 0


TOUCH = """
ok(d.cuCtxSetCurrent(ctx))
handle, address = mapped(G)
ok(d.cuMemcpyHtoD(address, b"gpu!", 4))
print(json.dumps({"read": ctypes.string_at(address, 4).decode()}), flush=True)
"""


@pytest.mark.parametrize("host_access", ["0", "1"])
def test_the_cpu_touching_device_memory_faults_as_on_a_gpu_host(
    libraries: Path, host_access: str
) -> None:
    environ = emulator.environment(libraries, node=f"touch{os.getpid()}{host_access}")
    environ["CUDAEMU_HOST_ACCESS"] = host_access
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + TOUCH],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if host_access == "1":  # (a test engine computing on the CPU in the GPU's place)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["read"] == "gpu!"
    else:
        assert out.returncode == -signal.SIGSEGV, out.stderr


PEER = """
ok(d.cuCtxSetCurrent(ctx))
handle, address = mapped(G)  # device 0's memory, open to device 0
both = []
for device in (0, 1):
    desc = d.CUmemAccessDesc()
    desc.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = device
    desc.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    both.append(desc)
out["open_to_1"] = name(d.cuMemSetAccess(address, G, both, 2)[0])
ok(d.cuCtxSetCurrent(ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(1))))))
stream = ok(d.cuStreamCreate(1))  # a stream of device 1
src = ctypes.create_string_buffer(4096)
ok(d.cuMemcpyHtoDAsync(address, ctypes.addressof(src), 4096, stream))
out["copy_from_1"] = name(d.cuStreamSynchronize(stream)[0])
"""


@pytest.mark.parametrize("peer", ["0", "1"])
def test_another_gpu_reaches_memory_only_with_peer_access_granted(
    libraries: Path, peer: str
) -> None:
    environ = emulator.environment(libraries, node=f"peer{os.getpid()}{peer}", devices=2)
    environ["CUDAEMU_PEER"] = peer
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + PEER + "\nprint(json.dumps(out))"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if peer == "1":
        assert got == {"open_to_1": "CUDA_SUCCESS", "copy_from_1": "CUDA_SUCCESS"}
    else:  # no P2P: access can't be granted, and device 1's copy faults
        assert got == {
            "open_to_1": "CUDA_ERROR_INVALID_DEVICE",
            "copy_from_1": "CUDA_ERROR_ILLEGAL_ADDRESS",
        }
