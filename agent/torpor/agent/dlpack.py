"""Bytes at an address as a torch tensor, through a DLPack capsule we build.

A DLPack tensor names its device explicitly, so torch never asks the driver
which device a pointer is on: the agent builds tensors over reserved device
ranges that are not mapped yet (a layer still offloaded, a model asleep),
where such a question fails. The capsule owns nothing: the memory is the
daemon's slab, mapped and unmapped by the agent; the structures the capsule
points to are kept alive by the returned `Keep` for as long as the tensor.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["CPU", "CUDA", "Keep", "byte_tensor"]

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
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_Managed))
_Managed._fields_ = [
    ("dl_tensor", _Tensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", _Deleter),
]


def _free_nothing(managed: object) -> None:
    """The consumer is done: the memory is the daemon's, the structures Keep's."""


_nothing_to_free = _Deleter(_free_nothing)


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class Keep:
    """What a capsule's tensor points into: keep it as long as the tensor."""

    def __init__(self, managed: _Managed, shape: ctypes.Array[ctypes.c_int64]) -> None:
        self.managed = managed
        self.shape = shape


def byte_tensor(
    address: int, nbytes: int, device_type: int, device_id: int
) -> tuple[torch.Tensor, Keep]:
    """A uint8 tensor of `nbytes` at `address` on the given device; no copy,
    no question to the driver."""
    import torch.utils.dlpack

    shape = (ctypes.c_int64 * 1)(nbytes)
    managed = _Managed()
    managed.dl_tensor.data = address
    managed.dl_tensor.device = _Device(device_type, device_id)
    managed.dl_tensor.ndim = 1
    managed.dl_tensor.dtype = _DataType(_UINT, 8, 1)
    managed.dl_tensor.shape = shape
    managed.dl_tensor.strides = None
    managed.dl_tensor.byte_offset = 0
    managed.manager_ctx = None
    managed.deleter = _nothing_to_free
    capsule = _capsule_new(ctypes.addressof(managed), b"dltensor", None)
    tensor: torch.Tensor = torch.utils.dlpack.from_dlpack(capsule)
    return tensor, Keep(managed, shape)
