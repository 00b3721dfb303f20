"""Bytes at an address as a torch tensor, through a DLPack capsule we build.

A DLPack tensor names its device explicitly, so torch never asks the driver
which device a pointer is on: the agent builds tensors over reserved device
ranges that are not mapped yet (a layer still offloaded, a model asleep),
where such a question fails. The capsule owns nothing of the memory (the
daemon's slab, mapped and unmapped by the agent). Its own structures live in
one block from the C allocator whose deleter is `free`: torch calls it when
the tensor's storage dies, however long that outlives the agent's objects
(module parameters kept after `close()`, interpreter teardown).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["CPU", "CUDA", "byte_tensor"]

CPU, CUDA = 1, 2  # DLDeviceType: kDLCPU, kDLCUDA
_UINT = 1  # DLDataTypeCode: kDLUInt


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _Device),
        ("ndim", ctypes.c_int32),
        ("dtype", _DataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _Managed(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _Tensor),
        ("manager_ctx", ctypes.c_void_p),
        # void (*)(DLManagedTensor*): C's free, so freeing needs no Python.
        ("deleter", ctypes.c_void_p),
    ]


_libc = ctypes.CDLL(None)
_malloc = _libc.malloc
_malloc.restype = ctypes.c_void_p
_malloc.argtypes = [ctypes.c_size_t]
_free = _libc.free
_free.restype = None
_free.argtypes = [ctypes.c_void_p]
_FREE = ctypes.cast(_libc.free, ctypes.c_void_p).value

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype = ctypes.c_int
_capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]

_SHAPE_AT = ctypes.sizeof(_Managed)  # the one-element shape follows the struct


def byte_tensor(address: int, nbytes: int, device_type: int, device_id: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` at `address` on the given device; no copy,
    no question to the driver."""
    import torch.utils.dlpack

    block = _malloc(_SHAPE_AT + ctypes.sizeof(ctypes.c_int64))
    if not block:
        raise MemoryError("no memory for a DLPack tensor")
    managed = _Managed.from_address(block)
    ctypes.c_int64.from_address(block + _SHAPE_AT).value = nbytes
    managed.dl_tensor.data = address
    managed.dl_tensor.device = _Device(device_type, device_id)
    managed.dl_tensor.ndim = 1
    managed.dl_tensor.dtype = _DataType(_UINT, 8, 1)
    managed.dl_tensor.shape = ctypes.cast(block + _SHAPE_AT, ctypes.POINTER(ctypes.c_int64))
    managed.dl_tensor.strides = None
    managed.dl_tensor.byte_offset = 0
    managed.manager_ctx = None
    managed.deleter = _FREE
    capsule = None
    try:
        capsule = _capsule_new(block, b"dltensor", None)
        tensor: torch.Tensor = torch.utils.dlpack.from_dlpack(capsule)
    except BaseException:
        # Not taken (torch renames a capsule it consumes): the block is ours.
        if capsule is None or _capsule_is_valid(capsule, b"dltensor"):
            _free(block)
        raise
    return tensor
