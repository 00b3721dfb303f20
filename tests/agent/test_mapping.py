"""Slabs at fixed addresses: tensors see the bytes, keep their address across
remaps, and fault (never read stale bytes) while unmapped."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from torpor.agent.mapping import MappingError, SlabRange, torch_dtype  # noqa: E402


def memfd(data: bytes) -> int:
    fd = os.memfd_create("test-slab", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().view(torch.uint8).numpy().tobytes())


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("F32", torch.float32),
        ("F16", torch.float16),
        ("BF16", torch.bfloat16),
        ("F8_E4M3", torch.float8_e4m3fn),
        ("F8_E5M2", torch.float8_e5m2),
        ("I64", torch.int64),
        ("U16", torch.uint16),
        ("BOOL", torch.bool),
    ],
)
def test_tensors_view_the_slab_bytes(name: str, dtype: torch.dtype) -> None:
    source = (torch.arange(24, dtype=torch.float32) / 7).to(dtype).reshape(4, 6)
    header = b"\xaa" * 256  # the tensor sits at an aligned offset inside the slab
    fd = memfd(header + raw(source))
    r = SlabRange(256 + len(raw(source)))
    try:
        r.map(fd)
        t = r.tensor(256, name, [4, 6])
        assert t.dtype == dtype and t.shape == (4, 6)
        assert raw(t) == raw(source)
        assert t.data_ptr() == r.address + 256  # a view, not a copy
    finally:
        r.release()
        os.close(fd)


def test_a_tensor_keeps_its_address_across_remaps() -> None:
    a, b = torch.arange(8, dtype=torch.float32), torch.arange(8, dtype=torch.float32) * -1
    fa, fb = memfd(raw(a)), memfd(raw(b))
    r = SlabRange(32)
    try:
        r.map(fa)
        t = r.tensor(0, "F32", [8])
        pointer = t.data_ptr()
        assert torch.equal(t, a)
        r.unmap()  # asleep: the range stays reserved
        r.map(fb)  # awake with a new slab, at the same address
        assert t.data_ptr() == pointer and torch.equal(t, b)
    finally:
        r.release()
        os.close(fa)
        os.close(fb)


def test_an_unmapped_slab_faults_instead_of_reading_stale_bytes() -> None:
    code = textwrap.dedent(
        """
        import os, torch
        from torpor.agent.mapping import SlabRange
        fd = os.memfd_create("s")
        os.write(fd, torch.ones(4).numpy().tobytes())
        r = SlabRange(16)
        r.map(fd)
        t = r.tensor(0, "F32", [4])
        print(float(t.sum()), flush=True)
        r.unmap()
        print(float(t.sum()), flush=True)  # must never print
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == -11  # SIGSEGV
    assert out.stdout.split() == ["4.0"]


def test_bad_uses_are_refused() -> None:
    fd = memfd(b"x" * 10)
    r = SlabRange(100)
    try:
        with pytest.raises(MappingError, match="smaller"):
            r.map(fd)
        with pytest.raises(ValueError, match="do not fit"):
            r.tensor(96, "F32", [2])
    finally:
        r.release()
        os.close(fd)
    with pytest.raises(MappingError, match="released"):
        r.map(fd)
    with pytest.raises(ValueError, match="F12"):
        torch_dtype("F12")


async def test_daemon_slabs_mapped_here_are_the_checkpoint_tensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The daemon's own slabs (memfds of the host backend), mapped at fixed
    addresses, give tensors bit-identical to safetensors' for every tensor."""
    from safetensors.torch import load_file
    from torpor.testing import make_checkpoint
    from torpord.backends.host import HostBackend
    from torpord.core.manager import ManagerSettings, ModelManager

    path = make_checkpoint(tmp_path / "m.safetensors", layers=3, hidden=32, dtype="BF16")
    backend = HostBackend(devices=1, device_capacity=1 << 24, host_capacity=1 << 24)
    manager = ModelManager(backend, ManagerSettings(allowed_roots=(tmp_path.resolve(),)))
    ranges = []
    try:
        await manager.load("m", str(path))
        reference = load_file(path)
        seen = 0
        for layer in manager.registry.models["m"].layers:
            assert layer.slab is not None
            r = SlabRange(layer.plan.size)
            ranges.append(r)
            r.map(backend.fd(layer.slab))
            for packed in layer.plan.tensors:
                t = packed.tensor
                mine = r.tensor(packed.slab_offset, t.dtype, t.shape)
                assert raw(mine) == raw(reference[t.name]), t.name
                seen += 1
        assert seen == len(reference)
    finally:
        for r in ranges:
            r.release()
        await manager.close(1.0)
        backend.close()
