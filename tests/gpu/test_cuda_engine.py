"""A real torpord on the CUDA backend and an engine process on the GPU: the
engine's forward passes (eager and a captured CUDA graph) are bit-identical
across 20 sleep/wake cycles (levels 1 and 2), the device memory really goes
back to the driver while the model sleeps, and an engine killed mid-wake
leaves the daemon consistent.

Skipped without a GPU, cuda-bindings, CuPy and a CUDA build of torch
(tests/gpu/run.sh runs it)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("cupy")
pytest.importorskip("cuda.bindings.driver")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from torpor import Client  # noqa: E402
from torpor.examples.tinylm import TinyConfig, make_checkpoint  # noqa: E402
from torpor.v1 import common_pb2, node_pb2  # noqa: E402
from torpord.cuda import driver  # noqa: E402

from tests.e2e.conftest import Daemon  # noqa: E402

MiB = 1 << 20
CONFIG = TinyConfig(layers=4, hidden=512, intermediate=1408, vocab=32768)

ENGINE = textwrap.dedent(
    """
    import hashlib, json, sys, torch
    from torpor import Client
    from torpor.agent import attach
    from torpor.agent.modules import empty_parameters, load_module
    from torpor.examples.tinylm import TinyConfig, TinyLM

    def say(value):
        print(json.dumps(value), flush=True)

    def digest(t):
        return hashlib.sha256(t.float().cpu().numpy().tobytes()).hexdigest()[:16]

    client = Client(socket=sys.argv[1])
    attached = attach(sys.argv[2], client=client, engine="gpu-engine")
    with empty_parameters():
        model = TinyLM(TinyConfig.from_state_dict(attached.state_dict()))
    load_module(model, attached)
    weights = {p.data_ptr() for p in model.parameters()}
    static = torch.tensor([list(b"Torpor on a GPU")], device="cuda")
    with attached.use(), torch.no_grad():
        eager = model(static)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            model(static)  # warm up on a side stream before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(static)
        graph.replay()
        torch.cuda.synchronize()
    # (The graph's kernels may differ from eager's: close, not always equal.)
    close = bool(torch.allclose(eager.float(), captured.float(), rtol=1e-3, atol=1e-3))
    say({"ready": True, "eager": digest(eager), "graph": digest(captured),
         "graph_close": close, "device": str(eager.device), "addresses": len(weights)})
    for line in sys.stdin:
        command = line.strip()
        if command == "forward":
            with attached.use(timeout=120), torch.no_grad():
                eager = model(static)
                graph.replay()
                torch.cuda.synchronize()
            same = {p.data_ptr() for p in model.parameters()} == weights
            say({"eager": digest(eager), "graph": digest(captured), "same_addresses": same})
        elif command == "quit":
            break
    attached.close()
    """
)


class Engine:
    def __init__(self, d: Daemon, model_id: str) -> None:
        # stderr to a file: a pipe nobody reads fills and stalls the engine.
        self.err = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ENGINE, str(d.socket), model_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
        )
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.hello = self.read()

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def read(self, timeout: float = 120) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            self.proc.wait(60)
            raise AssertionError(f"engine said nothing in {timeout:g}s:\n{self.stderr()}") from None
        if not line:
            self.proc.wait(60)
            raise AssertionError(f"engine exited {self.proc.returncode}:\n{self.stderr()}")
        value: dict[str, Any] = json.loads(line)
        return value

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # (end of output)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)
        self.err.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(
        tmp_path,
        config='[backend.cuda]\ndevice_memory = "4GiB"\n',
        args=("--backend", "cuda"),
        capacity="2GiB",
    )
    try:
        d.wait_ready()
        yield d
    finally:
        d.kill()


def settle(check: Any, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_an_engine_on_the_gpu_stays_bit_identical_across_sleeps_and_wakes(
    daemon: Daemon,
) -> None:
    path = make_checkpoint(daemon.models / "tiny", CONFIG)
    with Client(socket=str(daemon.socket)) as client:
        node = client.get_node()
        assert node.backend == node_pb2.BACKEND_CUDA
        model = client.load_model("tiny", str(path))
        size = model.bytes.total_bytes
        engine = Engine(daemon, "tiny")
        try:
            hello = engine.hello
            assert hello["device"].startswith("cuda")
            assert hello["graph_close"], hello  # the captured graph computes the model
            ordinal = next(d.index for d in node.devices)
            for cycle in range(20):
                awake, _ = driver.mem_info(ordinal)
                asleep = client.sleep_model("tiny", level=1 + cycle % 2)
                assert asleep.state == common_pb2.MODEL_STATE_ASLEEP
                assert asleep.last_transition.note == ""  # the engine let go in time
                freed, _ = driver.mem_info(ordinal)
                # Really returned to the driver (engine unmapped, daemon released).
                assert freed - awake >= size - 64 * MiB, (cycle, freed - awake, size)
                client.wake_model("tiny")
                answer = engine.ask("forward")
                assert answer == {
                    "eager": hello["eager"],
                    "graph": hello["graph"],
                    "same_addresses": True,
                }, cycle
        finally:
            engine.stop()


def test_an_engine_killed_mid_wake_leaves_the_daemon_consistent(daemon: Daemon) -> None:
    path = make_checkpoint(daemon.models / "tiny", CONFIG)
    with Client(socket=str(daemon.socket)) as client:
        client.load_model("tiny", str(path))
        engine = Engine(daemon, "tiny")
        client.sleep_model("tiny")
        client.wake_model("tiny", wait=False)
        os.kill(engine.proc.pid, signal.SIGKILL)
        engine.stop()
        assert settle(lambda: client.get_model("tiny").state == common_pb2.MODEL_STATE_ACTIVE)
        assert settle(lambda: client.get_model("tiny").engines == 0)
        again = Engine(daemon, "tiny")  # attachable again
        assert again.ask("forward")["eager"] == again.hello["eager"]
        again.stop()
        client.unload_model("tiny")
        node = client.get_node()
        assert all(d.used_bytes == 0 for d in node.devices)
        assert node.host_pool.used_bytes == 0
