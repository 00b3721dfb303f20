"""The daemon's CUDA backend and the agent's CUDA side, end to end, on an
emulated GPU (tests/emulator: a libcuda.so.1 and libnvidia-ml.so.1 that keep
device memory in memfds). The daemon runs `backend.kind = "cuda"` through the
real cuda-bindings and pynvml; an engine maps its slabs with the agent's
CUDA code and runs forward passes on them. What a GPU adds (DMA, kernels,
CUDA tensors) is tests/gpu's."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import emulator

from .conftest import Daemon
from .engines import Worker, reference, settle
from .residency import expected_layers

torch = pytest.importorskip("torch")
emulator.require()

from torpor import Client  # noqa: E402
from torpor.examples.tinylm import TinyConfig, make_checkpoint  # noqa: E402
from torpor.v1 import common_pb2  # noqa: E402
from torpord.storage.checksum import slab_checksum  # noqa: E402

ENGINE = Path(emulator.__file__).with_name("engine.py")
PROMPT = list(b"Torpor keeps weights where engines expect them")
SMALL = TinyConfig(layers=2, hidden=64, intermediate=176)
MiB = 1 << 20
GRANULE = 2 * MiB  # the emulated driver's allocation granularity
BACKEND = (
    '[backend]\nkind = "cuda"\n[backend.cuda]\ndevice_memory = "256MiB"\npinned_chunk = "32MiB"\n'
)


@pytest.fixture(scope="session")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return emulator.build(tmp_path_factory.getbasetemp() / "emulator")


@pytest.fixture
def gpu_env(libraries: Path, tmp_path: Path) -> dict[str, str]:
    """An emulated node of one 1 GiB GPU, of this test's own."""
    node = hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]
    return emulator.environment(libraries, node=node, memory=1 << 30, delay_us=50)


@pytest.fixture
def gpu_used(libraries: Path, gpu_env: dict[str, str]) -> Callable[[], int]:
    """What the (emulated) driver has in use on the GPU now, node-wide."""
    return lambda: emulator.used(libraries, gpu_env["CUDAEMU_NODE"])


def start_engine(d: Daemon, model_id: str, *flags: str) -> Worker:
    """tests/e2e/engine_worker.py on the emulated GPU (tests/emulator/engine.py)."""
    return Worker(d, model_id, *flags, script=ENGINE, env=d.env)


def padded(model: common_pb2.Model) -> int:
    """The model's bytes on the GPU: each layer an allocation, padded."""
    return sum(-(-layer.size_bytes // GRANULE) * GRANULE for layer in model.layers)


@pytest.fixture
def start(tmp_path: Path, gpu_env: dict[str, str]) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(config: str = "") -> Daemon:
        d = Daemon(tmp_path / f"d{len(started)}", config=config, backend=BACKEND, env=gpu_env)
        started.append(d)
        d.wait_ready()
        return d

    yield make
    for d in started:
        d.kill()


def test_the_daemon_runs_the_cuda_backend_on_the_gpu_it_discovers(
    start: Callable[..., Daemon],
) -> None:
    d = start()
    node = d.call("torpor.v1.NodeService/GetNode")["node"]
    assert node["backend"] == "BACKEND_CUDA", node
    (gpu,) = node["gpus"]
    (device,) = node["devices"]
    assert device["uuid"] == gpu["uuid"] == "GPU-7e57ca5e-" + gpu["uuid"][13:]
    assert device["capacity_bytes"] == str(256 * MiB)
    assert "memory_used_bytes" not in gpu  # (0: proto3 JSON leaves it out)
    assert gpu["display_name"] == "Torpor emulated GPU"
    assert int(gpu["memory_total_bytes"]) == 1 << 30


def device_slabs(pid: int) -> list[bytes]:
    """The bytes of every device allocation a process holds (the emulated
    driver's memfds, read through /proc/<pid>/fd), one per allocation."""
    found: dict[int, bytes] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if not os.readlink(path).startswith("/memfd:cudaemu:"):
                continue
            inode = os.stat(path).st_ino
            if inode not in found:
                with open(path, "rb") as f:
                    found[inode] = f.read()
        except FileNotFoundError:
            continue
    return sorted(found.values())


def on_the_gpu(model: dict[str, Any]) -> list[bytes]:
    """What the model's device allocations must hold: each layer's slab as
    the checkpoint says, in an allocation padded to the granularity (the
    emulated driver's fresh memory is zeros)."""
    return sorted(data + bytes(-len(data) % GRANULE) for data in expected_layers(model).values())


def get(d: Daemon, model_id: str) -> dict[str, Any]:
    model: dict[str, Any] = d.call(
        "torpor.v1.ModelService/GetModel", {"model_id": model_id, "view": "MODEL_VIEW_FULL"}
    )["model"]
    return model


def test_load_sleep_wake_unload_with_bytes_checked_and_memory_returned_to_the_driver(
    start: Callable[..., Daemon], gpu_used: Callable[[], int], tmp_path: Path
) -> None:
    d = start(f'[disk_cache]\npath = "{tmp_path / "cache"}"\ncapacity = "64MiB"\n')
    path = make_checkpoint(d.models / "tiny", SMALL)
    with Client(socket=str(d.socket)) as client:
        client.load_model("tiny", str(path))
        model = get(d, "tiny")
        want = on_the_gpu(model)
        on_gpu = sum(len(data) for data in want)
        assert device_slabs(d.proc.pid) == want
        assert gpu_used() == on_gpu  # one allocation per layer, as the driver pads it
        # The checksums taken at load (on the host, over a copy back: no kernels here)
        for layer, data in zip(model["layers"], expected_layers(model).values(), strict=True):
            assert layer["checksum"] == slab_checksum(data), layer["name"]
        for cycle in range(6):
            level = 1 + cycle % 2
            asleep = client.sleep_model("tiny", level=level)
            assert asleep.state == common_pb2.MODEL_STATE_ASLEEP
            assert device_slabs(d.proc.pid) == []
            assert gpu_used() == 0, f"cycle {cycle}: the driver still has the model's memory"
            awake = client.wake_model("tiny", verify=True)
            assert awake.state == common_pb2.MODEL_STATE_ACTIVE
            assert device_slabs(d.proc.pid) == want, f"cycle {cycle}"
            assert gpu_used() == on_gpu
        # Out to the disk cache (read out of the GPU through pinned memory) and back.
        client.offload_model("tiny", ["layers.1"], common_pb2.TIER_DISK)
        assert gpu_used() == on_gpu - GRANULE
        client.offload_model("tiny", [], common_pb2.TIER_DEVICE, verify=True)
        assert device_slabs(d.proc.pid) == want
        client.unload_model("tiny")
        assert gpu_used() == 0


def test_an_engine_runs_on_the_same_addresses_and_bytes_across_sleeps_and_wakes(
    start: Callable[..., Daemon], gpu_used: Callable[[], int]
) -> None:
    d = start()
    path = make_checkpoint(d.models / "tiny", SMALL)
    expected = reference(path)
    with Client(socket=str(d.socket)) as client:
        model = client.load_model("tiny", str(path))
        on_gpu = padded(model)
        engine = start_engine(d, "tiny")
        try:
            # The engine maps the daemon's allocations: the same memory, once.
            assert gpu_used() == on_gpu
            for cycle in range(10):
                asleep = client.sleep_model("tiny", level=1 + cycle % 2)
                assert asleep.engines == 1 and not asleep.last_transition.note
                assert gpu_used() == 0  # the engine let go too
                client.wake_model("tiny")
                assert engine.ask("fresh")["ok"]
            report = engine.ask("report")
        finally:
            engine.quit()
    assert report["ended"] is None
    assert report["digests"] == {expected: report["forwards"]}  # every pass, bit for bit


@pytest.mark.timeout(660)  # (the suite's own limit is 600 s)
def test_the_gpu_suite_passes_on_the_emulated_driver(libraries: Path, tmp_path: Path) -> None:
    """tests/gpu, as tests/gpu/run.sh runs it on a GPU, in a process on an
    emulated 8 GiB GPU: everything but the kernels and CUDA tensors runs."""
    env = emulator.environment(libraries, node=f"suite{os.getpid()}", memory=8 << 30)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/gpu"],
        env=env,
        cwd=Path(emulator.__file__).parent.parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    summary = out.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 12, out.stdout[-3000:]
    skipped = out.stdout.split("short test summary info")[-1]
    # Only what needs CuPy's kernels or a CUDA build of torch is skipped.
    for line in skipped.splitlines():
        if line.startswith("SKIPPED"):
            assert "cupy" in line or "kernels" in line or "CUDA" in line, line


def held(d: Daemon) -> int:
    node = d.call("torpor.v1.NodeService/GetNode")["node"]
    return sum(int(dev.get("held_bytes", 0)) for dev in node["devices"])


def test_a_hung_engine_keeps_its_memory_held_until_it_exits(
    start: Callable[..., Daemon], gpu_used: Callable[[], int]
) -> None:
    """On a GPU the daemon can't take memory back from an engine that still
    maps it: the engine is detached, its memory counted held (and the driver
    has it) until the process exits."""
    d = start('[agents]\nquiesce_timeout = "1s"\n')
    path = make_checkpoint(d.models / "tiny", SMALL)
    with Client(socket=str(d.socket)) as client:
        model = client.load_model("tiny", str(path))
        on_gpu = padded(model)
        engine = start_engine(d, "tiny", "--stall")  # its quiesce callback never returns
        try:
            asleep = client.sleep_model("tiny")
            assert asleep.state == common_pb2.MODEL_STATE_ASLEEP and asleep.engines == 0
            assert "detached" in asleep.last_transition.note
            assert gpu_used() == on_gpu  # the engine still maps every slab
            assert held(d) == on_gpu  # and the daemon says so
            node = d.ctl("node").stdout
            assert "held" in node, node
            assert engine.proc.poll() is None
        finally:
            engine.kill()
        assert settle(lambda: gpu_used() == 0 and held(d) == 0)
        client.wake_model("tiny")
        assert gpu_used() == on_gpu


def test_an_engine_that_does_not_let_go_is_killed_and_its_memory_returns(
    start: Callable[..., Daemon], gpu_used: Callable[[], int]
) -> None:
    d = start('[agents]\nquiesce_timeout = "1s"\non_quiesce_timeout = "kill"\n')
    path = make_checkpoint(d.models / "tiny", SMALL)
    with Client(socket=str(d.socket)) as client:
        client.load_model("tiny", str(path))
        engine = start_engine(d, "tiny", "--stall")
        try:
            asleep = client.sleep_model("tiny")
            assert "detached and killed" in asleep.last_transition.note
            engine.proc.communicate(timeout=60)
            assert engine.proc.returncode == -signal.SIGKILL
            assert settle(lambda: gpu_used() == 0 and held(d) == 0)
        finally:
            engine.kill()


def test_an_engine_killed_mid_wake_leaves_the_daemon_and_the_driver_consistent(
    start: Callable[..., Daemon], gpu_used: Callable[[], int]
) -> None:
    d = start()
    path = make_checkpoint(d.models / "tiny", SMALL)
    expected = reference(path)
    with Client(socket=str(d.socket)) as client:
        model = client.load_model("tiny", str(path))
        on_gpu = padded(model)
        engine = start_engine(d, "tiny")
        client.sleep_model("tiny")
        client.wake_model("tiny", wait=False)
        engine.proc.send_signal(signal.SIGKILL)
        engine.kill()
        assert settle(lambda: client.get_model("tiny").state == common_pb2.MODEL_STATE_ACTIVE)
        assert settle(lambda: client.get_model("tiny").engines == 0)
        assert settle(lambda: gpu_used() == on_gpu and held(d) == 0)
        again = start_engine(d, "tiny")  # attachable again, on the same bytes
        try:
            assert again.ask("fresh")["ok"]
            assert set(again.ask("report")["digests"]) == {expected}
        finally:
            again.quit()
        client.unload_model("tiny")
        assert gpu_used() == 0
        node = client.get_node()
        assert all(dev.used_bytes == 0 for dev in node.devices)
        assert node.host_pool.used_bytes == 0


def test_a_graceful_stop_hands_everything_back_to_the_driver(
    start: Callable[..., Daemon], gpu_used: Callable[[], int]
) -> None:
    d = start()
    path = make_checkpoint(d.models / "tiny", SMALL)
    with Client(socket=str(d.socket)) as client:
        client.load_model("tiny", str(path))
        client.load_model("asleep", str(path))
        client.sleep_model("asleep")
        engine = start_engine(d, "tiny")
        assert engine.ask("fresh")["ok"]
    assert d.stop() == 0, d.log()
    log = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    assert not [entry for entry in log if entry["level"] in ("error", "critical")], d.log()
    engine.proc.communicate(timeout=60)  # (stdin closed: it quits, unmapping)
    assert settle(lambda: gpu_used() == 0)


def run_daemon(root: Path, env: dict[str, str], backend: str) -> tuple[int, str]:
    """A torpord that is expected to stop at start: (exit code, its log)."""
    d = Daemon(root, backend=backend, env=env)
    try:
        code = d.proc.wait(60)
    finally:
        d.kill()
    return code, d.log()


def test_auto_finds_the_gpu_and_required_kernels_refuse_to_start_without_cupy(
    tmp_path: Path, gpu_env: dict[str, str]
) -> None:
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here (the case is a host without it)")
    d = Daemon(tmp_path / "auto", backend='[backend]\nkind = "auto"\n', env=gpu_env)
    try:
        d.wait_ready()
        node = d.call("torpor.v1.NodeService/GetNode")["node"]
        assert node["backend"] == "BACKEND_CUDA"
        assert node["backend_reason"] == "1 GPU(s): Torpor emulated GPU"
        assert "GPU kernels unavailable" in d.log()  # (no CuPy here: copies, host checksums)
    finally:
        d.kill()
    code, log = run_daemon(
        tmp_path / "required",
        gpu_env,
        '[backend]\nkind = "cuda"\n[backend.cuda]\nkernels = "required"\n',
    )
    assert code == 1
    (entry,) = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert entry["event"] == "cannot start"
    assert entry["error"] == (
        'backend.kind = "cuda": the CUDA backend could not start on 1 GPU(s) (Torpor emulated'
        " GPU): its kernels could not be built (ModuleNotFoundError: No module named 'cupy')"
        ' and backend.cuda.kernels = "required"'
    )
