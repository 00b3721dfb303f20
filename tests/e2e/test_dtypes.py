"""Every safetensors dtype that torch has reaches an engine: a checkpoint
with a tensor of each, loaded by the daemon and attached, gives the dtype,
shape and bytes that safetensors' own loader gives."""

from __future__ import annotations

import pytest

from .conftest import Daemon

torch = pytest.importorskip("torch")

from torpor import Client  # noqa: E402
from torpor.agent import attach  # noqa: E402
from torpor.agent.mapping import torch_dtype, torch_shape  # noqa: E402
from torpord.storage.safetensors import DTYPES  # noqa: E402

# What torch 2.13 lacks: no 6-bit float dtype.
NOT_IN_TORCH = {"F6_E2M3", "F6_E3M2"}


# Every dtype safetensors.torch saves: one a safetensors dtype.
TORCH_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64,
    torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint64, torch.uint32, torch.uint16, torch.uint8, torch.bool,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu, torch.float4_e2m1fn_x2,
]  # fmt: skip


def mapped() -> dict[str, torch.dtype]:
    found = {}
    for name in DTYPES:
        try:
            found[name] = torch_dtype(name)
        except ValueError:
            assert name in NOT_IN_TORCH, f"torch has a dtype for {name}"
    return found


def test_every_safetensors_dtype_torch_has_is_mapped() -> None:
    assert set(mapped()) == set(DTYPES) - NOT_IN_TORCH
    assert set(mapped().values()) == set(TORCH_DTYPES)
    assert not [d for d in dir(torch) if d.startswith("float6_")]
    with pytest.raises(ValueError, match="F6_E2M3"):
        torch_dtype("F6_E2M3")
    # torch packs F4 two values a byte along the last dimension.
    assert torch_shape("F4", [3, 8]) == (3, 4)
    with pytest.raises(ValueError, match=r"F4 tensor of shape \[2, 3\]"):
        torch_shape("F4", [2, 3])


def test_a_model_of_every_dtype_attaches_with_the_checkpoints_bytes(daemon: Daemon) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for dtype in TORCH_DTYPES:  # (safetensors names each: F4 is float4_e2m1fn_x2)
        size = torch.empty((), dtype=dtype).element_size()
        raw = torch.randint(0, 256, (3, 8 * size), dtype=torch.uint8, generator=generator)
        if dtype == torch.bool:
            raw &= 1
        tensors[f"x.{dtype}"] = raw.view(dtype)
    tensors["x.empty"] = torch.empty((0, 4), dtype=torch.complex64)
    path = daemon.models / "dtypes.safetensors"
    save_file(tensors, str(path))

    with Client(socket=str(daemon.socket)) as client:
        client.load_model("dtypes", str(path))
        with attach("dtypes", client=client) as model, safe_open(str(path), "pt") as f:
            state = model.state_dict()
            assert set(state) == set(f.keys())
            with model.use():
                for key in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                    expected, mine = f.get_tensor(key), state[key]
                    assert (mine.dtype, mine.shape) == (expected.dtype, expected.shape), key
                    assert torch.equal(mine.view(torch.uint8), expected.view(torch.uint8)), key


def test_an_image_of_every_dtype_publishes_the_given_bytes(daemon: Daemon) -> None:
    # F4's torch shape is half the safetensors one along the last dimension:
    # the catalogue must say the safetensors shape, or the daemon's slab and
    # the engine's view disagree with the tensor given.
    from torpor.agent import publish

    generator = torch.Generator().manual_seed(1)
    given = {}
    for dtype in TORCH_DTYPES:
        size = torch.empty((), dtype=dtype).element_size()
        raw = torch.randint(0, 256, (3, 8 * size), dtype=torch.uint8, generator=generator)
        if dtype == torch.bool:
            raw &= 1
        given[f"x.{dtype}"] = raw.view(dtype)
    with (
        Client(socket=str(daemon.socket)) as client,
        publish.publish("dtypes", "fp/dtypes", [("pre", given)], client=client) as model,
    ):
        state = model.state_dict()
        assert set(state) == set(given)
        with model.use():
            for key, expected in given.items():
                mine = state[key]
                assert (mine.dtype, mine.shape) == (expected.dtype, expected.shape), key
                assert torch.equal(mine.view(torch.uint8), expected.view(torch.uint8)), key
