"""Slab ranges on a GPU: the CUDA side of the agent, the same interface as
`torpor.agent.mapping.SlabRange`.

The daemon's CUDA backend creates each slab with the VMM API (`cuMemCreate`,
handle type POSIX file descriptor) and exports it as an fd; the agent imports
the fd (`cuMemImportFromShareableHandle`) and maps it at a virtual address
range it reserved once (`cuMemAddressReserve`), so tensors and captured CUDA
graphs stay valid across sleep and wake. Unmapping leaves the reservation:
a kernel touching it faults instead of reading stale memory.

Needs `cuda-bindings` (the `cuda12`/`cuda13` extras) and a CUDA build of
torch. NOT YET RUN ON A GPU: written against the driver API's documentation;
it runs in CI on an emulated driver (tests/emulator), with CPU views of the
same addresses for tensors; tests/gpu runs it on a device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torpor.agent.dlpack import CUDA, byte_tensor
from torpor.agent.mapping import MappingError, tensor_span, torch_shape
from torpor.cudadriver import Driver

if TYPE_CHECKING:
    import torch

__all__ = ["CudaSlabRange"]


def _failed(call: str, name: str) -> MappingError:
    return MappingError(0, f"{call} failed: {name}")


def _unavailable(message: str) -> MappingError:
    return MappingError(0, f"the model's slabs are CUDA memory: {message}")


# The helpers shared with the daemon (torpor.cudadriver), with the agent's errors.
_cuda = Driver(failed=_failed, unavailable=_unavailable)
_driver = _cuda.module
_check = _cuda.check
# The device's primary context (the one torch uses), made current on this
# thread: the agent's listener maps and unmaps on its own thread.
_context = _cuda.context


def ordinal_of(uuid: str) -> int:
    """This process's CUDA ordinal for the GPU named `uuid` (`GPU-...`, as
    NVML and the daemon name it): CUDA_VISIBLE_DEVICES may renumber GPUs."""
    for ordinal in range(_cuda.device_count()):
        if _cuda.uuid(ordinal) == uuid:
            return ordinal
    raise MappingError(
        0,
        f"the model's slabs are on GPU {uuid}, which this process cannot see"
        " (CUDA_VISIBLE_DEVICES?)",
    )


class CudaSlabRange:
    """One slab's reserved device address range in this process."""

    def __init__(self, size: int, device: int) -> None:
        if size <= 0:
            raise ValueError("a slab range needs a positive size")
        _context(device)
        self.size = size
        self.device = device
        granularity = _cuda.granularity(device)
        # The daemon pads each slab to the same granularity: the mapping covers it.
        self.length = -(-size // granularity) * granularity
        self.address = int(
            _check(_driver().cuMemAddressReserve(self.length, 0, 0, 0), "cuMemAddressReserve")
        )
        self.mapped = False
        self._released = False

    def map(self, fd: int, *, writable: bool = False) -> None:
        """Import the slab's fd and map it at this range, read-only unless
        `writable` (an image being published); the fd stays the caller's."""
        cu = _driver()
        self._check_live()
        _context(self.device)
        handle = _check(
            cu.cuMemImportFromShareableHandle(
                fd, cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
            ),
            "cuMemImportFromShareableHandle",
        )
        try:
            _check(cu.cuMemMap(self.address, self.length, 0, handle, 0), "cuMemMap")
        finally:
            # The mapping keeps the memory alive; the handle is not needed after.
            _check(cu.cuMemRelease(handle), "cuMemRelease")
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.device
        # Read-only but while publishing: a kernel's store into a model's
        # weights faults instead of changing what every engine maps. (The
        # importer sets its own access: a process that maps the fd READWRITE
        # itself can write, and the checksums that verify checks catch it.)
        flags = cu.CUmemAccess_flags
        access.flags = (
            flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            if writable
            else flags.CU_MEM_ACCESS_FLAGS_PROT_READ
        )
        try:
            _check(cu.cuMemSetAccess(self.address, self.length, [access], 1), "cuMemSetAccess")
        except MappingError:
            _check(cu.cuMemUnmap(self.address, self.length), "cuMemUnmap")
            raise
        self.mapped = True

    def unmap(self) -> None:
        """Drop the slab, keep the range. Work queued on it must be finished:
        the agent synchronises the device before it unmaps."""
        cu = _driver()
        self._check_live()
        if self.mapped:
            _context(self.device)
            _check(cu.cuCtxSynchronize(), "cuCtxSynchronize")
            _check(cu.cuMemUnmap(self.address, self.length), "cuMemUnmap")
            self.mapped = False

    def release(self) -> None:
        if self._released:
            return
        cu = _driver()
        _context(self.device)
        if self.mapped:
            self.unmap()
        _check(cu.cuMemAddressFree(self.address, self.length), "cuMemAddressFree")
        self._released = True

    def _check_live(self) -> None:
        if self._released:
            raise MappingError(0, "the range was released")

    def tensor(self, offset: int, dtype: str, shape: Sequence[int]) -> torch.Tensor:
        """A CUDA tensor viewing the range at offset: no copy, valid whenever a
        slab is mapped there."""
        import torch

        tdtype, nbytes = tensor_span(dtype, shape, offset, self.size)
        device = torch.device("cuda", self.device)
        if nbytes == 0:
            return torch.empty(torch_shape(dtype, shape), dtype=tdtype, device=device)
        # Bytes first (every dtype, bf16 and fp8 included, is a view of them),
        # through DLPack naming the device: the range may not be mapped yet,
        # and torch must not ask the driver about the pointer.
        raw = byte_tensor(self.address + offset, nbytes, CUDA, self.device)
        return raw.view(tdtype).reshape(torch_shape(dtype, shape))
