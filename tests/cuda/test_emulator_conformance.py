"""The emulator is held to what the real driver did: tests/gpu/run.sh runs
the conformance cases (tests/cuda/test_emulated_driver.py) on a GPU with
TORPOR_DRIVER=real and leaves conformance.json; committed as
tests/emulator/real-driver.json, the emulator must return the same, case by
case, except its known differences (conformance.DIFFERENCES)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import emulator
from tests.emulator import conformance
from tests.emulator.conformance import RECORD, compare, entry, run

if conformance.REAL:
    pytest.skip(
        "compares the emulator; TORPOR_DRIVER=real runs the real one", allow_module_level=True
    )

ROOT = Path(__file__).resolve().parents[2]
DRIVER_TESTS = "tests/cuda/test_emulated_driver.py"


@pytest.fixture(scope="module")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    emulator.require()
    return emulator.build(tmp_path_factory.getbasetemp() / "emulator")


def test_the_emulator_returns_what_the_real_driver_returned(request: pytest.FixtureRequest) -> None:
    record = conformance.recorded()
    if record is None:
        pytest.skip("no real-driver record yet: run tests/gpu/run.sh on a GPU")
    libraries: Path = request.getfixturevalue("libraries")
    found = compare(record, lambda name: run(libraries, name))
    assert not found, f"the emulator differs from {RECORD.name}:\n" + "\n".join(found)


def test_a_difference_from_the_record_is_found_unless_it_is_known(libraries: Path) -> None:
    same = {"cases": {"forbidden": entry("forbidden", run(libraries, "forbidden"))}}
    assert compare(same, lambda name: run(libraries, name)) == []

    other: dict[str, Any] = json.loads(json.dumps(same))
    case = other["cases"]["forbidden"]
    case["out"]["too_much"] = "CUDA_ERROR_INVALID_VALUE"
    case["out"]["offset_map"] = "CUDA_SUCCESS"  # (a known difference)
    del case["out"]["free_mapped"]
    assert compare(other, lambda name: run(libraries, name)) == [
        "forbidden.free_mapped: 'CUDA_ERROR_INVALID_VALUE' here, '(absent)' on the driver",
        "forbidden.too_much: 'CUDA_ERROR_OUT_OF_MEMORY' here,"
        " 'CUDA_ERROR_INVALID_VALUE' on the driver",
    ]

    case["digest"] = "0" * 16  # recorded from another version of the case
    assert compare(other, lambda name: pytest.fail("not run")) == [
        "forbidden: the case changed since it was recorded: record it again"
    ]


def real_mode(
    tmp_path: Path, env: dict[str, str], *select: str
) -> subprocess.CompletedProcess[str]:
    """The driver tests in real mode, as tests/gpu/run.sh runs them."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            DRIVER_TESTS,
            "-p",
            "no:cacheprovider",
            "-rs",
            f"--basetemp={tmp_path / 'pt'}",
            *select,
        ],
        cwd=ROOT,
        env={**env, conformance.SWITCH: "real", conformance.RESULTS: str(tmp_path / "out")},
        capture_output=True,
        text=True,
        timeout=100,
    )


SELECTED = "documentation or without_access or no_process or cpu_touching or another_gpu"


def test_the_real_mode_records_what_a_driver_returned(libraries: Path, tmp_path: Path) -> None:
    # The emulator stands in for the real driver here (as libcuda.so.1 on the
    # library path): everything but the driver is what runs on a GPU. (Its
    # cases with long copies are left out: they move 512 MiB each.)
    env = emulator.environment(libraries, node=f"standin{os.getpid()}", memory=1 << 30)
    done = real_mode(tmp_path, env, "-k", SELECTED)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "needs 2 GPUs; the real driver sees 1" in done.stdout
    assert "emulator only: CUDAEMU_HOST_ACCESS" in done.stdout

    record = json.loads((tmp_path / "out" / "conformance.json").read_text())
    assert record["driver"] == {
        "version": 13000,
        "devices": 1,
        "name": "Torpor emulated GPU",
        "peer": None,
    }
    assert sorted(record["cases"]) == [
        "copy_without_access",
        "forbidden",
        "memory",
        "touch_faults",
    ]
    assert record["cases"]["touch_faults"]["returncode"] < 0  # (SIGSEGV, recorded)
    assert record["cases"]["memory"]["out"]["total"] == 1 << 30
    assert list(record["cases"]["memory"]["differs"]) == ["total"]  # (and why)
    # What a GPU run leaves is what the comparison reads.
    assert compare(record, lambda name: run(libraries, name)) == []


def test_the_real_mode_skips_where_there_is_no_driver(tmp_path: Path) -> None:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        pass
    else:
        pytest.skip("this machine has a driver (libcuda.so.1)")
    done = real_mode(tmp_path, dict(os.environ))
    # (pytest's 5: no tests ran; the module skipped before any was collected)
    assert done.returncode == 5, done.stdout + done.stderr
    assert "1 skipped" in done.stdout
    assert "libcuda.so.1 can't be loaded" in done.stdout
    assert not (tmp_path / "out").exists()


def test_the_real_mode_skips_where_the_driver_sees_no_gpu(libraries: Path, tmp_path: Path) -> None:
    env = emulator.environment(libraries, node=f"nogpu{os.getpid()}", devices=0)
    done = real_mode(tmp_path, env)
    assert done.returncode == 5, done.stdout + done.stderr
    assert "no usable GPU: cuInit returned CUDA_ERROR_NO_DEVICE" in done.stdout
    assert not (tmp_path / "out").exists()
