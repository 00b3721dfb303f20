"""The CUDA driver helpers the daemon and the agent share (torpor.cudadriver),
on emulated GPUs (tests/emulator): both sides name the same device by the
same UUID, pad slabs to the same granularity, and turn a failed call into
their own error naming it. Each case is a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from torpor.cudadriver import uuid_string

from tests import emulator

pytest.importorskip("cuda.bindings.driver")
if (why := emulator.unavailable()) is not None:
    pytest.skip(why, allow_module_level=True)

BOTH_SIDES = textwrap.dedent(
    """
    import json
    from torpord.cuda import driver
    from torpor.agent import cuda as agent_cuda
    from torpor.agent.mapping import MappingError

    ordinals = driver.device_ordinals()
    out = {
        "ordinals": ordinals,
        "agent_ordinals": {uuid: agent_cuda.ordinal_of(uuid) for uuid in ordinals},
        "granularity": [driver.granularity(i) for i in ordinals.values()],
        "agent_length": [agent_cuda.CudaSlabRange(1, i).length for i in ordinals.values()],
    }
    try:
        driver.context(len(ordinals))  # no such device
    except driver.CudaError as err:
        out["daemon_error"] = [err.reason, err.call, err.message]
    try:
        agent_cuda.CudaSlabRange(1, len(ordinals))
    except MappingError as err:
        out["agent_error"] = str(err)
    try:
        agent_cuda.ordinal_of("GPU-00000000-0000-0000-0000-000000000000")
    except MappingError as err:
        out["unseen"] = str(err)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return emulator.build(tmp_path_factory.getbasetemp() / "emulator")


def run(libraries: Path, script: str) -> dict[str, Any]:
    environ = emulator.environment(libraries, node=f"shared{os.getpid()}", devices=2)
    out = subprocess.run(
        [sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_the_daemon_and_the_agent_see_the_same_devices_and_slab_sizes(libraries: Path) -> None:
    got = run(libraries, BOTH_SIDES)
    assert sorted(got["ordinals"].values()) == [0, 1]
    assert len(set(got["ordinals"])) == 2
    assert got["agent_ordinals"] == got["ordinals"]
    assert all(g > 1 for g in got["granularity"])
    assert got["agent_length"] == got["granularity"]  # (one byte, padded to one granule)


def test_a_failed_call_is_each_sides_error_naming_the_call(libraries: Path) -> None:
    got = run(libraries, BOTH_SIDES)
    reason, call, message = got["daemon_error"]
    assert (reason, call) == ("CUDA_ERROR", "cuDeviceGet")
    assert message == "cuDeviceGet failed: CUDA_ERROR_INVALID_DEVICE"
    assert "cuDeviceGet failed: CUDA_ERROR_INVALID_DEVICE" in got["agent_error"]
    assert "which this process cannot see" in got["unseen"]


def test_a_uuid_is_written_as_nvml_writes_it() -> None:
    raw = bytes(range(16))
    assert uuid_string(raw) == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
