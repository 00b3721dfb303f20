"""The emulated driver's conformance cases, runnable on either driver.

Each case is a script that calls the driver through cuda-bindings in a
process of its own and reports what it got (`out`: error names, sizes). By
default it runs on the emulated driver (tests/emulator); with
TORPOR_DRIVER=real it runs on this machine's real libcuda (device 0, device 1
where a case needs two), and each outcome is recorded in
$TORPOR_CONFORMANCE_OUT/conformance.json. tests/gpu/run.sh does that on a GPU
machine; committed as tests/emulator/real-driver.json, the record is what
`compare` holds the emulator to, except the DIFFERENCES below.

Where a case's emulated mechanics have no real counterpart, the real run uses
the real means to the same end (a large copy from page-locked memory keeps a
stream busy where the emulator delays each copy).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import emulator
from tests.emulator.scripts import PRELUDE, SCRIPTS

MiB = 1 << 20

SWITCH = "TORPOR_DRIVER"  # "emulated" (the default) or "real"
RESULTS = "TORPOR_CONFORMANCE_OUT"  # where a real run writes conformance.json
RECORD = Path(__file__).parent / "real-driver.json"

_mode = os.environ.get(SWITCH, "emulated")
if _mode not in ("emulated", "real"):
    raise RuntimeError(f"${SWITCH} is {_mode!r}: 'emulated' (the default) or 'real'")
REAL = _mode == "real"

# Where the emulator knowingly differs from the real driver: "case.key" and
# why. The real run doesn't assert these keys; `compare` doesn't compare them.
DIFFERENCES = {
    "forbidden.offset_map": "the driver maps from an offset into an allocation; the "
    "emulator maps whole allocations only (as the daemon, PyTorch and NCCL do)",
    "forbidden.part_map": "the driver maps part of an allocation; the emulator maps "
    "whole allocations only (as the daemon, PyTorch and NCCL do)",
    "unmap_queued.unmap": "the driver doesn't specify unmapping under queued copies "
    "(cuMemUnmap 'exhibits synchronous behavior'); the emulator faults, so no caller "
    "relies on it",
    "unmap_queued.after": "follows unmap_queued.unmap",
    "memory.total": "the emulated device has the memory the case gives it",
}


@dataclass(frozen=True)
class Case:
    script: str
    emulated: dict[str, str] = field(default_factory=dict)  # its environment there
    real: dict[str, str] = field(default_factory=dict)  # and on the real driver
    devices: int = 1
    memory: int = 64 * MiB  # (the emulated devices')
    emulator_only: str = ""  # why it can't run on a real driver, if so

    def digest(self) -> str:
        """What the case is, so a record made of an older case isn't held to."""
        text = json.dumps([PRELUDE, self.script, self.real, self.devices])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


CASES = {
    "forbidden": Case(SCRIPTS["forbidden"]),
    "stream_order": Case(
        SCRIPTS["stream_order"],
        emulated={"CUDAEMU_DELAY_US": "200000", "COPY_BYTES": "4096"},
        real={"COPY_BYTES": str(512 * MiB)},  # (~10 ms of copying at 50 GB/s)
    ),
    "unmap_queued": Case(
        SCRIPTS["unmap_queued"],
        emulated={"CUDAEMU_DELAY_US": "200000", "COPY_BYTES": "4096"},
        real={"COPY_BYTES": str(512 * MiB)},
    ),
    "copy_without_access": Case(SCRIPTS["copy_without_access"]),
    "memory": Case(SCRIPTS["memory"], memory=256 * MiB),
    "touch_faults": Case(SCRIPTS["touch"], emulated={"CUDAEMU_HOST_ACCESS": "0"}),
    "touch_host_access": Case(
        SCRIPTS["touch"],
        emulated={"CUDAEMU_HOST_ACCESS": "1"},
        emulator_only="CUDAEMU_HOST_ACCESS lets the CPU compute in a GPU's place; "
        "no real driver opens device memory to the CPU",
    ),
    "read_only": Case(SCRIPTS["read_only"]),
    "peer_refused": Case(SCRIPTS["peer"], emulated={"CUDAEMU_PEER": "0"}, devices=2),
    "peer_granted": Case(SCRIPTS["peer"], emulated={"CUDAEMU_PEER": "1"}, devices=2),
}


def differs(case: str, key: str) -> bool:
    """Whether this run is on the real driver and the emulator knowingly
    differs from it there (DIFFERENCES)."""
    return REAL and f"{case}.{key}" in DIFFERENCES


@dataclass(frozen=True)
class Outcome:
    out: dict[str, Any]  # what the script reported, even if it died part-way
    returncode: int | None  # None: it ran out of time
    stderr: str


def entry(name: str, outcome: Outcome) -> dict[str, Any]:
    """Case `name`'s outcome as the record holds it: with the case's digest,
    the last line of stderr where it failed, and its known differences."""
    found: dict[str, Any] = {
        "digest": CASES[name].digest(),
        "out": outcome.out,
        "returncode": outcome.returncode,
    }
    if outcome.returncode != 0 and outcome.stderr.strip():
        found["error"] = outcome.stderr.strip().splitlines()[-1]
    known = {k.split(".", 1)[1]: why for k, why in DIFFERENCES.items() if k.startswith(f"{name}.")}
    if known:
        found["differs"] = known
    return found


@dataclass(frozen=True)
class RealDriver:
    version: int
    devices: int
    name: str
    peer: bool | None  # whether devices 0 and 1 reach each other (None: one GPU)


_counter = itertools.count()


def run(libraries: Path | None, name: str) -> Outcome:
    """Run case `name` on the emulated driver built in `libraries`, or on the
    real one (REAL; `libraries` unused), recording a real outcome."""
    case = CASES[name]
    if REAL:  # (as this process's: what loads libcuda.so.1 is the machine's)
        env = {**os.environ, **case.real}
    else:
        assert libraries is not None
        node = f"c{os.getpid()}n{next(_counter)}"
        env = emulator.environment(libraries, node=node, devices=case.devices, memory=case.memory)
        env.update(case.emulated)
    try:
        done = subprocess.run(
            [sys.executable, "-c", PRELUDE + case.script],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        outcome = Outcome(_reported(done.stdout), done.returncode, done.stderr)
    except subprocess.TimeoutExpired as late:
        stdout = late.stdout.decode() if isinstance(late.stdout, bytes) else late.stdout or ""
        outcome = Outcome(_reported(stdout), None, "timed out after 30 s")
    if REAL:
        _record(name, entry(name, outcome))
    return outcome


def _reported(stdout: str) -> dict[str, Any]:
    """The script's `out`: one JSON object a line, each as it was set."""
    out: dict[str, Any] = {}
    for line in stdout.splitlines():
        try:
            reported = json.loads(line)
        except json.JSONDecodeError:
            continue  # (not the script's: a library's own output)
        if isinstance(reported, dict):
            out.update(reported)
    return out


_results: dict[str, Any] = {}


def _record(name: str, found: dict[str, Any]) -> None:
    where = os.environ.get(RESULTS)
    if not where:
        return
    driver = real_driver()
    _results.setdefault("driver", asdict(driver) if isinstance(driver, RealDriver) else {})
    _results.setdefault("cases", {})[name] = found
    path = Path(where) / "conformance.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(_results, indent=1, sort_keys=True) + "\n")
    partial.replace(path)


_driver: list[RealDriver | str] = []


def real_driver() -> RealDriver | str:
    """This machine's real driver, or why there is none to run on (probed
    once, in this process, with cuInit only: no context is created here)."""
    if not _driver:
        _driver.append(_probe())
    return _driver[0]


def _probe() -> RealDriver | str:
    try:
        import cuda.bindings.driver  # noqa: F401  (what the cases call the driver with)
    except ImportError as err:
        return f"cuda-bindings can't be imported ({err})"
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        return f"no real driver here: libcuda.so.1 can't be loaded ({err})"

    def failed(code: int) -> str:
        text = ctypes.c_char_p()
        lib.cuGetErrorName(code, ctypes.byref(text))
        return (text.value or b"?").decode()

    code = lib.cuInit(0)
    if code:
        return f"no usable GPU: cuInit returned {failed(code)}"
    count, version, can = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    lib.cuDeviceGetCount(ctypes.byref(count))
    if count.value == 0:
        return "no GPU: the real driver sees no device"
    lib.cuDriverGetVersion(ctypes.byref(version))
    name = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(name, 256, 0)
    peer = None
    if count.value > 1 and lib.cuDeviceCanAccessPeer(ctypes.byref(can), 0, 1) == 0:
        peer = bool(can.value)
    return RealDriver(version.value, count.value, name.value.decode(), peer)


def require_real() -> RealDriver:
    """The real driver, or a skip of the calling module that says why not."""
    found = real_driver()
    if isinstance(found, str):
        pytest.skip(f"${SWITCH}=real: {found}", allow_module_level=True)
    return found


def recorded() -> dict[str, Any] | None:
    """The committed record of the real driver's outcomes, if there is one."""
    if not RECORD.is_file():
        return None
    record: dict[str, Any] = json.loads(RECORD.read_text())
    return record


def compare(record: dict[str, Any], emulated: Callable[[str], Outcome]) -> list[str]:
    """Where the emulator (`emulated(name)` runs a case on it) returns other
    than the real driver did in `record`, one line each; DIFFERENCES aside."""
    found = []
    for name, real in sorted(record["cases"].items()):
        case = CASES.get(name)
        if case is None or case.digest() != real["digest"]:
            found.append(f"{name}: the case changed since it was recorded: record it again")
            continue
        got = emulated(name)
        if got.returncode != real["returncode"]:
            found.append(f"{name}: exit {got.returncode} here, {real['returncode']} on the driver")
        for key in sorted(set(got.out) | set(real["out"])):
            if f"{name}.{key}" in DIFFERENCES:
                continue
            mine, theirs = got.out.get(key, "(absent)"), real["out"].get(key, "(absent)")
            if mine != theirs:
                found.append(f"{name}.{key}: {mine!r} here, {theirs!r} on the driver")
    return found
