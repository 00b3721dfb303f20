"""Tensors built through our own DLPack capsules (how the agent's CUDA side
builds tensors over ranges that may not be mapped yet), checked on the CPU:
same address, no copy, every dtype a view of the bytes, and building one over
an inaccessible range touches nothing."""

from __future__ import annotations

import ctypes
import gc

import pytest

torch = pytest.importorskip("torch")

from torpor.agent.dlpack import CPU, byte_tensor  # noqa: E402
from torpor.agent.mapping import SlabRange  # noqa: E402


def test_a_capsule_tensor_is_the_memory_itself() -> None:
    buf = (ctypes.c_uint8 * 4096)(*(i % 251 for i in range(4096)))
    raw, keep = byte_tensor(ctypes.addressof(buf), 4096, CPU, 0)
    assert raw.dtype == torch.uint8 and raw.shape == (4096,)
    assert raw.data_ptr() == ctypes.addressof(buf)
    buf[7] = 200
    assert int(raw[7]) == 200  # a view, not a copy
    halves = raw[:64].view(torch.bfloat16).reshape(4, 8)
    assert halves.data_ptr() == ctypes.addressof(buf)
    fp8 = raw[64:96].view(torch.float8_e4m3fn)
    assert fp8.shape == (32,)
    del raw, halves, fp8
    gc.collect()
    assert keep.managed.dl_tensor.data == ctypes.addressof(buf)


def test_building_over_an_inaccessible_range_touches_nothing() -> None:
    r = SlabRange(1 << 20)  # reserved PROT_NONE, nothing mapped
    try:
        raw, _keep = byte_tensor(r.address, 1 << 20, CPU, 0)
        view = raw[4096:8192].view(torch.float16).reshape(64, 32)
        assert view.data_ptr() == r.address + 4096  # built without a fault
    finally:
        r.release()
