"""The conformance cases' scripts (conformance.py runs them): each is run as
PRELUDE + script by `python -c` on the emulated or the real driver, and
reports through `out`, which prints each entry as it is set, so a process
that dies part-way still says how far it got."""

from __future__ import annotations

PRELUDE = """
import json, os, sys, ctypes, mmap
from cuda.bindings import driver as d

SUCCESS = d.CUresult.CUDA_SUCCESS

def name(err):
    return d.cuGetErrorName(err)[1].decode()

def ok(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    assert err == SUCCESS, name(err)
    return rest[0] if len(rest) == 1 else rest

class Out(dict):
    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(json.dumps({key: value}), flush=True)

out = Out()
ok(d.cuInit(0))
dev = ok(d.cuDeviceGet(0))
ctx = ok(d.cuDevicePrimaryCtxRetain(dev))
prop = d.CUmemAllocationProp()
prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
prop.location.id = 0
prop.requestedHandleTypes = (
    d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
)
# The granularity, asked in a context pushed and popped: no context is
# current when a case begins.
ok(d.cuCtxPushCurrent(ctx))
G = ok(d.cuMemGetAllocationGranularity(
    prop, d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM))
ok(d.cuCtxPopCurrent())

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

def pinned(n, start=b""):
    # n bytes of page-locked host memory (registered), beginning with `start`:
    # copies from and to it run asynchronously on a real GPU.
    buf = mmap.mmap(-1, n)
    buf[: len(start)] = start
    at = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    ok(d.cuMemHostRegister(at, n, 0))
    return buf, at

def granules(n):
    return -(-n // G) * G
"""

FORBIDDEN = """
out["no_context"] = name(d.cuStreamCreate(0)[0])
made = d.cuMemCreate(G, prop, 0)  # (the VMM calls need no current context)
out["create_no_context"] = name(made[0])
if made[0] == SUCCESS:
    ok(d.cuMemRelease(made[1]))
ok(d.cuCtxSetCurrent(ctx))
out["unaligned_create"] = name(d.cuMemCreate(G + 4096, prop, 0)[0])
total = ok(d.cuDeviceTotalMem(dev))
out["too_much"] = name(d.cuMemCreate(granules(total + 1), prop, 0)[0])
once = ok(d.cuMemCreate(G, prop, 0))
ok(d.cuMemRelease(once))
out["released_twice"] = name(d.cuMemRelease(once)[0])
buf = ctypes.create_string_buffer(4096)
at = ctypes.addressof(buf)
ok(d.cuMemHostRegister(at, 4096, 0))
out["registered_twice"] = name(d.cuMemHostRegister(at, 4096, 0)[0])
ok(d.cuMemHostUnregister(at))
out["unregistered_twice"] = name(d.cuMemHostUnregister(at)[0])

handle = ok(d.cuMemCreate(2 * G, prop, 0))
address = int(ok(d.cuMemAddressReserve(2 * G, 0, 0, 0)))

def refused(key, err, at, length):
    out[key] = name(err)
    if err == SUCCESS:  # (allowed after all: undone, so the next check starts as before)
        ok(d.cuMemUnmap(at, length))

refused("offset_map", d.cuMemMap(address + G, G, G, handle, 0)[0], address + G, G)
refused("part_map", d.cuMemMap(address, G, 0, handle, 0)[0], address, G)
out["access_unmapped"] = name(access(address, 2 * G)[0])
ok(d.cuMemMap(address, 2 * G, 0, handle, 0))
ok(access(address, 2 * G))
out["unmap_part"] = name(d.cuMemUnmap(address, G)[0])
out["free_mapped"] = name(d.cuMemAddressFree(address, 2 * G)[0])
ok(d.cuMemUnmap(address, 2 * G))
ok(d.cuMemAddressFree(address, 2 * G))
ok(d.cuMemRelease(handle))
"""

# COPY_BYTES: how much the first copy moves, so that what follows it is still
# queued when the case looks (on the emulator, CUDAEMU_DELAY_US slows it).
STREAM_ORDER = """
ok(d.cuCtxSetCurrent(ctx))
n = int(os.environ["COPY_BYTES"])
handle, address = mapped(granules(n))
stream = ok(d.cuStreamCreate(1))
event = ok(d.cuEventCreate(0))
src, src_at = pinned(n, b"x" * 4096)
back, back_at = pinned(4096)
ok(d.cuMemcpyHtoDAsync(address, src_at, n, stream))
ok(d.cuMemcpyDtoHAsync(back_at, address, 4096, stream))
ok(d.cuEventRecord(event, stream))
out["queued"] = name(d.cuEventQuery(event)[0])
out["back_before"] = back[:4].decode(errors="replace")
ok(d.cuEventSynchronize(event))
out["done"] = name(d.cuEventQuery(event)[0])
out["back_after"] = back[:4].decode()
"""

UNMAP_QUEUED = """
ok(d.cuCtxSetCurrent(ctx))
n = int(os.environ["COPY_BYTES"])
size = granules(n)
handle, address = mapped(size)
stream = ok(d.cuStreamCreate(1))
src, src_at = pinned(n)
ok(d.cuMemcpyHtoDAsync(address, src_at, n, stream))
out["unmap"] = name(d.cuMemUnmap(address, size)[0])
out["after"] = name(d.cuStreamSynchronize(stream)[0])
"""

COPY_WITHOUT_ACCESS = """
ok(d.cuCtxSetCurrent(ctx))
handle = ok(d.cuMemCreate(G, prop, 0))
address = ok(d.cuMemAddressReserve(G, 0, 0, 0))
ok(d.cuMemMap(address, G, 0, handle, 0))  # (no cuMemSetAccess)
stream = ok(d.cuStreamCreate(1))
src = ctypes.create_string_buffer(4096)
out["copy"] = name(d.cuMemcpyHtoDAsync(address, ctypes.addressof(src), 4096, stream)[0])
out["sync"] = name(d.cuStreamSynchronize(stream)[0])
out["later"] = name(d.cuStreamCreate(1)[0])
"""

# The memory in use, as cuMemGetInfo's free memory before and after: only
# differences within this process, large enough (64 granules) to stand out of
# what the driver itself takes meanwhile.
MEMORY = """
ok(d.cuCtxSetCurrent(ctx))
size = 64 * G
free0, total = ok(d.cuMemGetInfo())
out["size"] = size
out["total"] = total
handle, address = mapped(size)
fd = ok(d.cuMemExportToShareableHandle(
    handle, d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0))
out["inheritable"] = os.get_inheritable(fd)
out["created"] = free0 - ok(d.cuMemGetInfo())[0]
ok(d.cuMemUnmap(address, size))
ok(d.cuMemRelease(handle))
out["exported_fd_keeps_it"] = free0 - ok(d.cuMemGetInfo())[0]
other = ok(d.cuMemImportFromShareableHandle(
    fd, d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR))
os.close(fd)
out["imported_keeps_it"] = free0 - ok(d.cuMemGetInfo())[0]
ok(d.cuMemMap(address, size, 0, other, 0))
ok(d.cuMemRelease(other))
out["mapping_keeps_it"] = free0 - ok(d.cuMemGetInfo())[0]
ok(d.cuMemUnmap(address, size))
out["gone"] = free0 - ok(d.cuMemGetInfo())[0]
"""

TOUCH = """
ok(d.cuCtxSetCurrent(ctx))
handle, address = mapped(G)
ok(d.cuMemcpyHtoD(address, b"gpu!", 4))
out["read"] = ctypes.string_at(address, 4).decode()
"""

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

# An importer's mapping with read access only (as the agent maps a model's
# slabs): reads see the memory, a write into it faults (a copy's, as a
# kernel's store would). PROT_READ is CUmemAccess_flags' "make the address
# range read accessible".
READ_ONLY = """
ok(d.cuCtxSetCurrent(ctx))
POSIX_FD = d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
handle, address = mapped(G)
ok(d.cuMemcpyHtoD(address, b"gpu!", 4))
fd = ok(d.cuMemExportToShareableHandle(handle, POSIX_FD, 0))
imported = ok(d.cuMemImportFromShareableHandle(fd, POSIX_FD))
os.close(fd)
reader = int(ok(d.cuMemAddressReserve(G, 0, 0, 0)))
ok(d.cuMemMap(reader, G, 0, imported, 0))
ok(d.cuMemRelease(imported))
desc = d.CUmemAccessDesc()
desc.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
desc.location.id = 0
desc.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READ
out["set_read"] = name(d.cuMemSetAccess(reader, G, [desc], 1)[0])
back = ctypes.create_string_buffer(4)
out["read"] = name(d.cuMemcpyDtoH(back, reader, 4)[0])
out["bytes"] = back.raw.decode(errors="replace")
stream = ok(d.cuStreamCreate(1))
src = ctypes.create_string_buffer(b"evil", 4)
out["write"] = name(d.cuMemcpyHtoDAsync(reader, ctypes.addressof(src), 4, stream)[0])
out["sync"] = name(d.cuStreamSynchronize(stream)[0])
"""

SCRIPTS = {
    "forbidden": FORBIDDEN,
    "stream_order": STREAM_ORDER,
    "unmap_queued": UNMAP_QUEUED,
    "copy_without_access": COPY_WITHOUT_ACCESS,
    "memory": MEMORY,
    "touch": TOUCH,
    "peer": PEER,
    "read_only": READ_ONLY,
}
