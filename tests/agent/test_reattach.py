"""What a reattach accepts: the same kind of memory and, for a GPU's slabs,
the same GPU (a tensor's device can't change under it)."""

from __future__ import annotations

import grpc
import pytest
from torpor.v1 import agent_pb2

pytest.importorskip("torch")

from torpor.agent._session import moved as _moved

GPU0 = "GPU-00000000-0000-0000-0000-000000000000"
GPU1 = "GPU-11111111-1111-1111-1111-111111111111"


def attached(kind: str, device: str = "", index: int = 0) -> agent_pb2.Attached:
    return agent_pb2.Attached(
        slab_kind=kind, device=f"devices/{device}" if device else "", device_index=index
    )


def test_the_same_place_is_accepted() -> None:
    assert _moved("m", "cuda", GPU0, attached("cuda", GPU0, index=3)) is None
    # Host memory is host memory, whichever emulated device holds it.
    assert _moved("m", "memfd", "HOST-a", attached("memfd", "HOST-b", index=1)) is None
    assert _moved("m", "memfd", "", attached("")) is None  # (an older daemon's default)


@pytest.mark.parametrize(
    ("kind", "device", "now", "words"),
    [
        ("cuda", GPU0, attached("cuda", GPU1), f"cuda slabs on {GPU1}"),
        ("cuda", GPU0, attached("memfd", "HOST-a"), "now in memfd slabs"),
        ("memfd", "HOST-a", attached("cuda", GPU0), "in memfd slabs and cannot move"),
    ],
)
def test_another_gpu_or_kind_of_memory_is_refused(
    kind: str, device: str, now: agent_pb2.Attached, words: str
) -> None:
    err = _moved("m", kind, device, now)
    assert err is not None
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "DEVICE_CHANGED")
    assert words in err.message and "'m'" in err.message
