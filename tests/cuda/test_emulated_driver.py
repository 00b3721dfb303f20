"""The emulated driver (tests/emulator) refuses what the CUDA documentation
forbids, faults where a GPU would, and frees memory when a GPU would: the
emulated tests are only as good as that. Each case (tests/emulator/scripts.py)
runs in a process of its own on a node of its own, through cuda-bindings.

With TORPOR_DRIVER=real the same cases run on this machine's real driver
(tests/gpu/run.sh does, first) and check the same rules, except where the
emulator knowingly differs (conformance.DIFFERENCES) or works by means of its
own (its memory size, its fault reports on stderr): each real outcome is
recorded ($TORPOR_CONFORMANCE_OUT/conformance.json) either way."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests import emulator
from tests.emulator import conformance
from tests.emulator.conformance import REAL, MiB, differs, run

if REAL:
    DRIVER = conformance.require_real()
else:
    emulator.require()


@pytest.fixture(scope="module")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    if REAL:
        return None
    return emulator.build(tmp_path_factory.getbasetemp() / "emulator")


def test_what_the_documentation_forbids_is_refused(libraries: Path | None) -> None:
    done = run(libraries, "forbidden")
    assert done.returncode == 0, done.stderr
    got = done.out
    assert got["no_context"] == "CUDA_ERROR_INVALID_CONTEXT"
    assert got["create_no_context"] == "CUDA_SUCCESS"
    assert got["unaligned_create"] == "CUDA_ERROR_INVALID_VALUE"
    if not differs("forbidden", "offset_map"):
        assert got["offset_map"] == "CUDA_ERROR_INVALID_VALUE"  # "offset ... must be zero"
    if not differs("forbidden", "part_map"):
        assert got["part_map"] == "CUDA_ERROR_INVALID_VALUE"
    assert got["access_unmapped"] == "CUDA_ERROR_INVALID_VALUE"
    assert got["unmap_part"] == "CUDA_ERROR_INVALID_VALUE"
    assert got["free_mapped"] == "CUDA_ERROR_INVALID_VALUE"
    assert got["released_twice"] == "CUDA_ERROR_INVALID_VALUE"
    assert got["registered_twice"] == "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"
    assert got["unregistered_twice"] == "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED"
    assert got["too_much"] == "CUDA_ERROR_OUT_OF_MEMORY"


def test_copies_run_in_stream_order_after_the_call_and_events_say_when(
    libraries: Path | None,
) -> None:
    done = run(libraries, "stream_order")
    assert done.returncode == 0, done.stderr
    got = done.out
    assert got["queued"] == "CUDA_ERROR_NOT_READY"
    assert got["back_before"] == "\0\0\0\0"
    assert got["done"] == "CUDA_SUCCESS"
    assert got["back_after"] == "xxxx"


def test_unmapping_memory_with_copies_queued_is_a_sticky_fault(libraries: Path | None) -> None:
    done = run(libraries, "unmap_queued")
    assert done.returncode == 0, done.stderr
    if differs("unmap_queued", "unmap"):  # (recorded, with why: not asserted)
        return
    assert done.out["unmap"] == done.out["after"] == "CUDA_ERROR_ILLEGAL_ADDRESS"
    assert "FAULT" in done.stderr and "still queued" in done.stderr


def test_a_copy_to_memory_without_access_faults(libraries: Path | None) -> None:
    done = run(libraries, "copy_without_access")
    assert done.returncode == 0, done.stderr
    got = done.out
    assert got["copy"] == "CUDA_SUCCESS"  # (the fault comes when the copy runs)
    assert got["sync"] == got["later"] == "CUDA_ERROR_ILLEGAL_ADDRESS"
    if not REAL:  # (the emulator's report of the fault)
        assert "without that device's access" in done.stderr


def test_a_read_only_mapping_reads_and_a_write_into_it_faults(libraries: Path | None) -> None:
    """What the agent relies on for a model's slabs (an image's above all):
    mapped with read access only, an engine's writes fault."""
    done = run(libraries, "read_only")
    assert done.returncode == 0, done.stderr
    got = done.out
    assert got["set_read"] == got["read"] == "CUDA_SUCCESS"
    assert got["bytes"] == "gpu!"
    # The write never lands quietly (refused, or a fault when it runs).
    assert (got["write"], got["sync"]) != ("CUDA_SUCCESS", "CUDA_SUCCESS"), got
    if not REAL:  # (the emulator faults when the copy runs, as for no access)
        assert got["write"] == "CUDA_SUCCESS"
        assert got["sync"] == "CUDA_ERROR_ILLEGAL_ADDRESS"
        assert "without that device's access" in done.stderr


def test_memory_returns_when_no_process_holds_or_maps_it(libraries: Path | None) -> None:
    done = run(libraries, "memory")
    assert done.returncode == 0, done.stderr
    got = done.out
    size = got["size"]
    assert size == 64 * 2 * MiB
    assert got["inheritable"] is True  # (the driver's fd: the daemon sets close-on-exec)
    held = ("created", "exported_fd_keeps_it", "imported_keeps_it", "mapping_keeps_it")
    if REAL:
        # Free memory is the whole GPU's: what the driver (or anything else)
        # takes meanwhile shows too, so these are held to a quarter of `size`.
        assert got["total"] > size
        slack = size // 4
        assert all(abs(got[key] - size) <= slack for key in held), got
        assert abs(got["gone"]) <= slack, got
    else:
        assert got["total"] == 256 * MiB
        assert all(got[key] == size for key in held), got
        assert got["gone"] == 0


@pytest.mark.parametrize("host_access", ["0", "1"])
def test_the_cpu_touching_device_memory_faults_as_on_a_gpu_host(
    libraries: Path | None, host_access: str
) -> None:
    name = "touch_host_access" if host_access == "1" else "touch_faults"
    if REAL and conformance.CASES[name].emulator_only:
        pytest.skip(f"emulator only: {conformance.CASES[name].emulator_only}")
    done = run(libraries, name)
    if host_access == "1":  # (a test engine computing on the CPU in the GPU's place)
        assert done.returncode == 0, done.stderr
        assert done.out["read"] == "gpu!"
    else:
        assert done.returncode == -signal.SIGSEGV, done.stderr


@pytest.mark.parametrize("peer", ["0", "1"])
def test_another_gpu_reaches_memory_only_with_peer_access_granted(
    libraries: Path | None, peer: str
) -> None:
    if REAL:  # (whether GPUs reach each other is the machine's, not a setting)
        if DRIVER.peer is None:
            pytest.skip(f"needs 2 GPUs; the real driver sees {DRIVER.devices}")
        if DRIVER.peer != (peer == "1"):
            can = "can" if DRIVER.peer else "cannot"
            pytest.skip(
                f"this machine's GPUs 0 and 1 {can} reach each other (cuDeviceCanAccessPeer)"
            )
    done = run(libraries, "peer_granted" if peer == "1" else "peer_refused")
    assert done.returncode == 0, done.stderr
    if peer == "1":
        assert done.out == {"open_to_1": "CUDA_SUCCESS", "copy_from_1": "CUDA_SUCCESS"}
    else:  # no P2P: access can't be granted, and device 1's copy faults
        assert done.out == {
            "open_to_1": "CUDA_ERROR_INVALID_DEVICE",
            "copy_from_1": "CUDA_ERROR_ILLEGAL_ADDRESS",
        }
