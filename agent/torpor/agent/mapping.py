"""Slabs at fixed addresses in the engine's process (host backend), and tensors on them.

An engine's tensors must keep their addresses across Sleep and Wake (CUDA
graphs and captured pointers depend on it), so each slab gets one virtual
range, reserved once with `PROT_NONE` and never given back while the engine
runs. Mapping a slab's memfd puts it in that range with `MAP_FIXED`; unmapping
puts an inaccessible anonymous mapping back in its place, so the range stays
reserved and a stray access faults instead of reading stale bytes; a later
slab (after Wake) is mapped at the same address, and every tensor built on
the range sees the new bytes.

Python's mmap module cannot place a mapping, so this goes through libc.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["MappingError", "SlabRange", "tensor_span", "torch_dtype", "torch_shape"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_NONE = 0  # not in Python's mmap module
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_MAP_POPULATE = 0x8000
_PAGE = mmap.PAGESIZE


class MappingError(OSError):
    pass


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    result = _libc.mmap(addr, length, prot, flags, fd, offset)
    if result is None or result == _MAP_FAILED:
        err = ctypes.get_errno()
        raise MappingError(err, f"mmap failed: {os.strerror(err)}")
    return int(result)


class SlabRange:
    """One slab's reserved address range in this process."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("a slab range needs a positive size")
        self.size = size
        self.length = -(-size // _PAGE) * _PAGE
        self.address = _mmap(
            None,
            self.length,
            _PROT_NONE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
            -1,
            0,
        )
        self.mapped = False
        self._released = False

    def map(self, fd: int, *, writable: bool = False) -> None:
        """Put the slab in `fd` (a memfd of at least `size` bytes) at this range."""
        self._check_live()
        if os.fstat(fd).st_size < self.size:
            raise MappingError(0, f"slab file is smaller than the {self.size}-byte range")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        # MAP_POPULATE: the page tables are filled now, in one go in the kernel,
        # not by a fault per page in the engine's first forward pass.
        flags = mmap.MAP_SHARED | _MAP_FIXED | _MAP_POPULATE
        _mmap(self.address, self.length, prot, flags, fd, 0)
        self.mapped = True

    def unmap(self) -> None:
        """Drop the slab but keep the range: accesses fault until the next map()."""
        self._check_live()
        _mmap(
            self.address,
            self.length,
            _PROT_NONE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE,
            -1,
            0,
        )
        self.mapped = False

    def release(self) -> None:
        """Give the range back (only when no tensor on it will be used again)."""
        if not self._released:
            _libc.munmap(self.address, self.length)
            self._released = True
            self.mapped = False

    def _check_live(self) -> None:
        if self._released:
            raise MappingError(0, "the range was released")

    def tensor(self, offset: int, dtype: str, shape: Sequence[int]) -> torch.Tensor:
        """A tensor (safetensors dtype, shape) viewing the range at offset: no copy,
        valid for the life of the range, whatever slab is mapped there."""
        import torch

        tdtype, nbytes = tensor_span(dtype, shape, offset, self.size)
        if nbytes == 0:
            return torch.empty(torch_shape(dtype, shape), dtype=tdtype)
        raw = (ctypes.c_uint8 * nbytes).from_address(self.address + offset)
        flat = torch.frombuffer(raw, dtype=torch.uint8)
        return flat.view(tdtype).reshape(torch_shape(dtype, shape))


def tensor_span(
    dtype: str, shape: Sequence[int], offset: int, size: int
) -> tuple[torch.dtype, int]:
    """The torch dtype and byte length of a tensor at `offset` in a `size`-byte
    slab; ValueError if it does not fit."""
    import torch

    tdtype = torch_dtype(dtype)
    nbytes = torch.empty((), dtype=tdtype).element_size()
    for dim in torch_shape(dtype, shape):
        nbytes *= dim
    if offset < 0 or offset + nbytes > size:
        raise ValueError(f"{nbytes} bytes at {offset} do not fit a {size}-byte slab")
    return tdtype, nbytes


def torch_shape(dtype: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The torch shape of a safetensors tensor: its own, except for F4, whose
    torch dtype (float4_e2m1fn_x2) holds two values a byte, so its last
    dimension is half the checkpoint's (as safetensors itself loads it);
    ValueError for an F4 tensor whose last dimension is odd."""
    if dtype != "F4":
        return tuple(shape)
    if not shape or shape[-1] % 2:
        raise ValueError(
            f"an F4 tensor of shape {list(shape)} has no torch shape: torch packs two"
            " values a byte along the last dimension, which must be even"
        )
    return (*shape[:-1], shape[-1] // 2)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name; ValueError for one torch
    has no dtype for (F6_E2M3, F6_E3M2 in torch 2.13)."""
    import torch

    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "C64": torch.complex64,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U64": torch.uint64,
        "U32": torch.uint32,
        "U16": torch.uint16,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    # The narrow floats came one torch release at a time; those this torch
    # lacks stay unmapped (ValueError below).
    for safetensors_name, torch_name in (
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
        ("F8_E8M0", "float8_e8m0fnu"),
        ("F4", "float4_e2m1fn_x2"),
    ):
        value = getattr(torch, torch_name, None)
        if isinstance(value, torch.dtype):
            table[safetensors_name] = value
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"no torch dtype for safetensors dtype {name!r}") from None
