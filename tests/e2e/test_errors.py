"""Every bad input gets a clear status with an ErrorInfo reason, and changes nothing."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from torpor.testing import make_checkpoint

from .conftest import Daemon
from .failures import (
    ALREADY_EXISTS,
    DATA_LOSS,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    fail,
)


def raw_safetensors(
    path: Path, header: dict[str, Any] | bytes, data: bytes, *, length: int | None = None
) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


F16 = {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}

MALFORMED: dict[str, tuple[Any, bytes, int | None, str]] = {
    # name: (header, data, header length to claim, what the message must say)
    # (entries by their place in the header: never what the file says)
    "truncated": (
        {"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
        b"\0" * 9,
        None,
        "1st entry",
    ),
    "header_past_end": ({"a": F16}, b"\0" * 8, 10_000, "header"),
    "huge_header": ({"a": F16}, b"\0" * 8, 2**40, "header"),
    "not_utf8": (b'{"\xff\xfe": 1}', b"", None, "UTF-8"),
    "not_json": (b"{not json", b"", None, "JSON"),
    "unknown_dtype": (
        {"w": {"dtype": "F12", "shape": [2], "data_offsets": [0, 3]}},
        b"\0" * 3,
        None,
        "dtype that safetensors does not know",
    ),
    "shape_span_mismatch": (
        {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        b"\0" * 8,
        None,
        "1st entry",
    ),
    "overlapping": (
        {"a": F16, "b": {"dtype": "F16", "shape": [2, 2], "data_offsets": [4, 12]}},
        b"\0" * 12,
        None,
        "2nd entry",
    ),
    "out_of_bounds": (
        {"a": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64]}},
        b"\0" * 8,
        None,
        "1st entry",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_is_invalid_argument(daemon: Daemon, case: str) -> None:
    header, data, length, named = MALFORMED[case]
    path = raw_safetensors(daemon.models / f"{case}.safetensors", header, data, length=length)
    status = fail(daemon, "LoadModel", {"model_id": "bad", "source": str(path), "wait": True})
    assert status["code"] == INVALID_ARGUMENT, status
    assert status["reason"] == "INVALID_CHECKPOINT"
    assert named in status["message"], status["message"]
    assert status["metadata"]["file"] == str(path)
    assert_nothing_held(daemon)


def assert_nothing_held(d: Daemon) -> None:
    assert d.call("torpor.v1.ModelService/ListModels") == {}
    node = d.call("torpor.v1.NodeService/GetNode")["node"]
    assert "used_bytes" not in node["host_pool"]
    assert all("used_bytes" not in dev for dev in node["devices"])


def test_user_errors_have_their_codes_and_change_nothing(daemon: Daemon, tmp_path: Path) -> None:
    status = fail(daemon, "GetModel", {"model_id": "ghost"})
    assert (status["code"], status["reason"]) == (NOT_FOUND, "MODEL_NOT_FOUND")
    for method in ("SleepModel", "WakeModel", "OffloadModel", "UnloadModel"):
        assert fail(daemon, method, {"model_id": "ghost"})["code"] == NOT_FOUND

    outside = make_checkpoint(tmp_path / "outside.safetensors", layers=1)
    status = fail(daemon, "LoadModel", {"model_id": "m", "source": str(outside)})
    assert (status["code"], status["reason"]) == (PERMISSION_DENIED, "SOURCE_NOT_ALLOWED")
    escape = daemon.models / "escape.safetensors"
    escape.symlink_to(outside)
    assert (
        fail(daemon, "LoadModel", {"model_id": "m", "source": str(escape)})["code"]
        == PERMISSION_DENIED
    )

    status = fail(
        daemon, "LoadModel", {"model_id": "m", "source": str(daemon.models / "none.safetensors")}
    )
    assert (status["code"], status["reason"]) == (NOT_FOUND, "SOURCE_NOT_FOUND")
    status = fail(daemon, "LoadModel", {"model_id": "no/slash", "source": str(outside)})
    assert (status["code"], status["reason"]) == (INVALID_ARGUMENT, "INVALID_MODEL_ID")
    status = fail(daemon, "LoadModel", {"model_id": "m", "source": "models/relative"})
    assert status["code"] == INVALID_ARGUMENT
    assert_nothing_held(daemon)

    ckpt = make_checkpoint(daemon.models / "a.safetensors", layers=2)
    other = make_checkpoint(daemon.models / "b.safetensors", layers=2, seed=1)
    daemon.call(
        "torpor.v1.ModelService/LoadModel", {"model_id": "m", "source": str(ckpt), "wait": True}
    )
    status = fail(daemon, "LoadModel", {"model_id": "m", "source": str(other)})
    assert (status["code"], status["reason"]) == (ALREADY_EXISTS, "MODEL_EXISTS")
    status = fail(
        daemon, "OffloadModel", {"model_id": "m", "layers": ["layers.7"], "tier": "TIER_HOST"}
    )
    assert (status["code"], status["reason"]) == (INVALID_ARGUMENT, "UNKNOWN_LAYER")
    assert "layers.7" in status["message"]
    status = fail(daemon, "SleepModel", {"model_id": "m", "level": 5})
    assert (status["code"], status["reason"]) == (INVALID_ARGUMENT, "INVALID_SLEEP_LEVEL")

    daemon.call("torpor.v1.ModelService/SleepModel", {"model_id": "m", "level": 2, "wait": True})
    status = fail(daemon, "OffloadModel", {"model_id": "m", "tier": "TIER_DEVICE"})
    assert (status["code"], status["reason"]) == (FAILED_PRECONDITION, "INVALID_STATE")

    # A source changed since Load: a level-2 wake refuses it, and so does a
    # level-1 sleep (which would read it back into HOST).
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 0x55
    ckpt.write_bytes(bytes(data))
    status = fail(daemon, "WakeModel", {"model_id": "m", "wait": True})
    assert (status["code"], status["reason"]) == (FAILED_PRECONDITION, "SOURCE_CHANGED")
    status = fail(daemon, "SleepModel", {"model_id": "m", "level": 1, "wait": True})
    assert (status["code"], status["reason"]) == (FAILED_PRECONDITION, "SOURCE_CHANGED")
    m = daemon.call("torpor.v1.ModelService/GetModel", {"model_id": "m"})["model"]
    assert (m["state"], m["sleep_level"], m["state_reason"]) == (
        "MODEL_STATE_ASLEEP",
        2,
        "SOURCE_CHANGED",
    )

    daemon.call("torpor.v1.ModelService/UnloadModel", {"model_id": "m", "wait": True})
    assert_nothing_held(daemon)


def test_out_of_memory_is_resource_exhausted_with_numbers(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "big", layers=2, hidden=1024, vocab=40_000, dtype="F32")
    status = fail(daemon, "LoadModel", {"model_id": "big", "source": str(ckpt), "wait": True})
    assert (status["code"], status["reason"]) == (RESOURCE_EXHAUSTED, "OUT_OF_MEMORY")
    assert {"asked", "free", "budget"} <= set(status["metadata"])
    assert int(status["metadata"]["asked"]) > int(status["metadata"]["free"])
    assert_nothing_held(daemon)


def test_verified_wake_of_a_corrupted_host_slab_is_data_loss(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "v", layers=3)
    call = daemon.call
    call("torpor.v1.ModelService/LoadModel", {"model_id": "v", "source": str(ckpt), "wait": True})
    call("torpor.v1.ModelService/SleepModel", {"model_id": "v", "level": 1, "wait": True})
    # Flip a byte of the pinned copy of layers.1, in the daemon's own memfd.
    fd_dir = f"/proc/{daemon.proc.pid}/fd"
    for fd in os.listdir(fd_dir):
        if os.readlink(f"{fd_dir}/{fd}").startswith("/memfd:torpor:v:layers.1:host"):
            with open(f"{fd_dir}/{fd}", "r+b") as f:
                first = f.read(1)
                f.seek(0)
                f.write(bytes([first[0] ^ 0x40]))
            break
    else:
        raise AssertionError("no host slab for layers.1")
    status = fail(daemon, "WakeModel", {"model_id": "v", "wait": True, "verify": True})
    assert (status["code"], status["reason"]) == (DATA_LOSS, "CHECKSUM_MISMATCH")
    assert status["metadata"]["layer"] == "layers.1" and "layers.1" in status["message"]
    # The corrupt host copy is refused: the model sleeps at level 2 now.
    m = call("torpor.v1.ModelService/GetModel", {"model_id": "v"})["model"]
    assert (m["state"], m["state_reason"]) == ("MODEL_STATE_ASLEEP", "HOST_COPY_CORRUPT")
    assert m["sleep_level"] == 2
    node = call("torpor.v1.NodeService/GetNode")["node"]
    assert all("used_bytes" not in dev for dev in node["devices"])
