"""Tensors built through our own DLPack capsules (how the agent's CUDA side
builds tensors over ranges that may not be mapped yet), checked on the CPU:
same address, no copy, every dtype a view of the bytes, and building one over
an inaccessible range touches nothing."""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from torpor.agent.dlpack import CPU, byte_tensor  # noqa: E402
from torpor.agent.mapping import SlabRange  # noqa: E402


def test_a_capsule_tensor_is_the_memory_itself() -> None:
    buf = (ctypes.c_uint8 * 4096)(*(i % 251 for i in range(4096)))
    raw = byte_tensor(ctypes.addressof(buf), 4096, CPU, 0)
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


def test_building_over_an_inaccessible_range_touches_nothing() -> None:
    r = SlabRange(1 << 20)  # reserved PROT_NONE, nothing mapped
    try:
        raw = byte_tensor(r.address, 1 << 20, CPU, 0)
        view = raw[4096:8192].view(torch.float16).reshape(64, 32)
        assert view.data_ptr() == r.address + 4096  # built without a fault
    finally:
        r.release()


OUTLIVE = textwrap.dedent(
    """
    import ctypes, gc
    import torch
    from torpor.agent.dlpack import CPU, byte_tensor

    buf = (ctypes.c_uint8 * 65536)()
    kept = []
    for i in range(200):
        raw = byte_tensor(ctypes.addressof(buf) + 256 * i, 256, CPU, 0)
        kept.append(raw.view(torch.float16).reshape(8, 16))
        del raw
    gc.collect()
    junk = [bytearray(64) for _ in range(100000)]  # reuse whatever was freed
    assert all(t.shape == (8, 16) for t in kept)
    del kept  # each storage's deleter runs now
    gc.collect()
    print("ok", flush=True)
    """
)


def test_a_tensor_owns_its_capsule_structures() -> None:
    """Nothing but the tensor keeps the DLPack structures alive, and they are
    freed (by C's free) when its storage dies: run where freed memory is
    scribbled on, so a structure freed too early, or twice, crashes."""
    env = dict(os.environ, PYTHONMALLOC="malloc", MALLOC_PERTURB_="165", MALLOC_CHECK_="3")
    out = subprocess.run(
        [sys.executable, "-c", OUTLIVE], capture_output=True, text=True, env=env, timeout=120
    )
    assert (out.returncode, out.stdout.strip()) == (0, "ok"), out.stderr


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_in_use() -> int:
    """Bytes C's malloc has handed out and not had back (glibc's mallinfo2)."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("no mallinfo2 (glibc 2.33 or later) to count C's heap with")
    mallinfo2 = libc.mallinfo2
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def test_a_refused_capsule_is_freed_not_leaked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tensor's structures are one malloc'd block (72 bytes); a capsule
    torch refuses must hand its block back, or C's heap grows by one a try."""
    import torch.utils.dlpack

    def refuse(capsule: object) -> None:
        raise RuntimeError("refused")

    monkeypatch.setattr(torch.utils.dlpack, "from_dlpack", refuse)
    buf = (ctypes.c_uint8 * 64)()

    def refused(times: int) -> None:
        for _ in range(times):
            try:
                byte_tensor(ctypes.addressof(buf), 64, CPU, 0)
            except RuntimeError as err:
                assert str(err) == "refused"
            else:
                raise AssertionError("torch took a refused capsule")

    refused(1000)  # (whatever the first tries allocate once)
    before = malloc_in_use()
    tries = 20_000
    refused(tries)
    assert malloc_in_use() - before < tries * 36  # half a block a try: none kept
