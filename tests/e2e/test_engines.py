"""Engines running forward passes on a real torpord's slabs while other
processes sleep, wake, offload and unload the model; engines that hang or die."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import Daemon
from .engines import Worker, reference
from .observe import open_fds, settle, used

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402
from torpor import Client  # noqa: E402
from torpor.examples.tinylm import TinyConfig, make_checkpoint  # noqa: E402
from torpor.v1 import common_pb2  # noqa: E402

SMALL = TinyConfig(layers=2, hidden=64, intermediate=176)
# Big embedding and head (128 MiB each) around small blocks: a wake takes long
# enough between the first block and the last layer to see progressive wake.
WIDE = TinyConfig(layers=2, hidden=64, intermediate=176, vocab=1 << 20)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []
    workers: list[Worker] = []

    def make(config: str = "", capacity: str = "256MiB", roots: tuple[Path, ...] = ()) -> Daemon:
        d = Daemon(tmp_path / f"d{len(started)}", config=config, capacity=capacity, roots=roots)
        started.append(d)
        d.wait_ready()
        return d

    make.workers = workers  # type: ignore[attr-defined]
    yield make
    for w in workers:
        w.kill()
    for d in started:
        d.kill()


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("wide"), WIDE)


def test_forward_passes_stay_bit_identical_across_50_sleeps_and_wakes(
    start: Callable[..., Daemon],
) -> None:
    d = start()
    path = make_checkpoint(d.models / "tiny", SMALL)
    expected = reference(path)
    with Client(socket=str(d.socket)) as client:
        client.load_model("tiny", str(path))
        worker = Worker(d, "tiny")
        start.workers.append(worker)  # type: ignore[attr-defined]
        try:
            for cycle in range(50):
                level = 1 + cycle % 2
                asleep = client.sleep_model("tiny", level=level)
                assert asleep.state == common_pb2.MODEL_STATE_ASLEEP
                assert asleep.engines == 1 and not asleep.last_transition.note
                assert used(client)[0] == 0  # the device memory is really free
                awake = client.wake_model("tiny")
                assert awake.state == common_pb2.MODEL_STATE_ACTIVE
                assert worker.ask("fresh")["ok"]  # a forward pass ran on the woken weights
            report = worker.ask("report")
        finally:
            worker.quit()
    assert report["ended"] is None
    assert report["digests"] == {expected: report["forwards"]}  # every pass, bit for bit
    assert report["forwards"] >= 50


def test_progressive_wake_runs_the_first_block_before_the_last_layer_is_back(
    start: Callable[..., Daemon], wide: Path
) -> None:
    d = start(capacity="1GiB", roots=(wide.parent,))
    path = wide
    with Client(socket=str(d.socket)) as client:
        client.load_model("wide", str(path))
        worker = Worker(d, "wide", "--short")
        start.workers.append(worker)  # type: ignore[attr-defined]
        try:
            for _ in range(10):  # a loaded machine can miss the window now and then
                client.sleep_model("wide")
                client.wake_model("wide")
                assert worker.ask("fresh")["ok"]
                report = worker.ask("report")
                if report["progressive"]:
                    break
        finally:
            worker.quit()
    assert report["progressive"] >= 1, report
    assert len(report["digests"]) == 1


def test_offload_unmaps_just_those_layers_and_unload_ends_the_attachment(
    start: Callable[..., Daemon],
) -> None:
    d = start()
    path = make_checkpoint(d.models / "tiny", SMALL)
    expected = reference(path)
    with Client(socket=str(d.socket)) as client:
        client.load_model("tiny", str(path))
        worker = Worker(d, "tiny", "--events")
        start.workers.append(worker)  # type: ignore[attr-defined]
        assert "Engines:  1 attached" in d.ctl("get", "tiny").stdout
        client.offload_model("tiny", ["layers.1"], common_pb2.TIER_HOST)
        assert worker.read() == {"event": "quiesce", "layers": ["layers.1"]}
        client.offload_model("tiny", [], common_pb2.TIER_DEVICE)
        assert worker.read() == {"event": "resume", "layers": ["layers.1"]}
        assert worker.ask("fresh")["ok"]
        client.unload_model("tiny")
        assert worker.read()["event"] == "quiesce"
        assert settle(lambda: worker.ask("report")["ended"] == "MODEL_UNLOADED")
        report = worker.ask("report")
        assert used(client) == (0, 0)
        worker.quit()
    assert set(report["digests"]) == {expected}


def test_an_engine_killed_mid_sleep_leaves_the_daemon_consistent(
    start: Callable[..., Daemon],
) -> None:
    d = start(config='[agents]\nquiesce_timeout = "5m"\n')
    path = make_checkpoint(d.models / "tiny", SMALL)
    with Client(socket=str(d.socket)) as client:
        baseline = open_fds(d.proc.pid) if client.get_node() else 0
        client.load_model("tiny", str(path))
        worker = Worker(d, "tiny", "--stall")  # its quiesce callback never returns
        start.workers.append(worker)  # type: ignore[attr-defined]
        client.sleep_model("tiny", wait=False)

        def stage() -> int:
            progress = client.get_model("tiny").progress
            return progress.stage

        assert settle(lambda: stage() == common_pb2.STAGE_QUIESCE)
        os.kill(worker.proc.pid, signal.SIGKILL)
        # The stream breaks, the daemon stops waiting (long before the 5 minutes).
        assert settle(lambda: client.get_model("tiny").state == common_pb2.MODEL_STATE_ASLEEP)
        model = client.get_model("tiny")
        assert model.engines == 0 and model.sleep_level == 1
        assert "went away before letting go of the weights" in model.last_transition.note
        assert used(client)[0] == 0
        client.unload_model("tiny")
        assert used(client) == (0, 0)
        assert settle(lambda: open_fds(d.proc.pid) == baseline), open_fds(d.proc.pid)


def test_shutdown_ends_within_its_grace_period_whatever_an_engine_does(
    start: Callable[..., Daemon],
) -> None:
    """A hung engine holds a Sleep in its quiesce for up to 5 minutes; SIGTERM
    stops the daemon within its 5 s grace period all the same: the engine is
    detached, the Sleep ends (done, or aborted if the grace period is spent
    first: which one depends on the machine's speed), both sockets are
    removed, exit 0."""
    d = start(config='[agents]\nquiesce_timeout = "5m"\n')
    path = make_checkpoint(d.models / "tiny", SMALL)
    with Client(socket=str(d.socket)) as client:
        client.load_model("tiny", str(path))
        worker = Worker(d, "tiny", "--stall")  # its quiesce callback never returns
        start.workers.append(worker)  # type: ignore[attr-defined]
        client.sleep_model("tiny", wait=False)
        assert settle(lambda: client.get_model("tiny").progress.stage == common_pb2.STAGE_QUIESCE)
    assert d.stop(signal.SIGTERM, timeout=60) == 0  # (long before the engine's 5 minutes)
    assert not d.socket.exists() and not d.socket.with_name(d.socket.name + ".fds").exists()
    events = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    assert any(e["event"] == "engine revoked" and "detached" in e["note"] for e in events)
    (sleep_end,) = [
        e
        for e in events
        if e.get("transition") == "SLEEP" and e["event"] in ("transition done", "transition failed")
    ]
    if sleep_end["event"] == "transition failed":
        assert sleep_end["error"] == "the daemon is shutting down", sleep_end
    assert events[-1]["event"] == "stopped" and events[-1]["clean"] is True


def test_a_forced_unload_tells_the_waiting_caller_why(start: Callable[..., Daemon]) -> None:
    """A Sleep held up by a hung engine, its caller waiting; `unload --force`
    cancels it: the caller and the log name the forced unload as the cause."""
    d = start(config='[agents]\nquiesce_timeout = "5m"\n')
    path = make_checkpoint(d.models / "tiny", SMALL)
    with Client(socket=str(d.socket)) as client:
        client.load_model("tiny", str(path))
        worker = Worker(d, "tiny", "--stall")
        start.workers.append(worker)  # type: ignore[attr-defined]
        sleeping = subprocess.Popen(
            [sys.executable, "-m", "torpor.cli", "--socket", str(d.socket), "sleep", "tiny"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert settle(lambda: client.get_model("tiny").progress.stage == common_pb2.STAGE_QUIESCE)
        # (--no-wait: the Unload then waits for the hung engine in turn.)
        d.ctl("unload", "tiny", "--force", "--no-wait", "--request-id", "ops-42")
        _, err = sleeping.communicate(timeout=60)
        os.kill(worker.proc.pid, signal.SIGKILL)  # (and the Unload goes on)
        assert settle(lambda: not client.list_models())
        assert sleeping.returncode == 1
        assert "ABORTED" in err and "CANCELLED" in err
        assert "cancelled by a forced unload of model 'tiny' (request_id 'ops-42')" in err
        assert "shutting down" not in err and "shutting down" not in d.log()
        assert "cancelled by a forced unload" in d.log()


def test_an_engine_killed_mid_wake_leaves_the_daemon_consistent(
    start: Callable[..., Daemon], wide: Path
) -> None:
    d = start(capacity="1GiB", roots=(wide.parent,))
    path = wide
    with Client(socket=str(d.socket)) as client:
        baseline = open_fds(d.proc.pid) if client.get_node() else 0
        client.load_model("wide", str(path))
        worker = Worker(d, "wide", "--events", "--short")
        start.workers.append(worker)  # type: ignore[attr-defined]
        client.sleep_model("wide")
        assert worker.read()["event"] == "quiesce"
        client.wake_model("wide", wait=False)
        assert worker.read()["event"] == "resume"  # the first layer is back: kill it now
        os.kill(worker.proc.pid, signal.SIGKILL)
        assert settle(lambda: client.get_model("wide").state == common_pb2.MODEL_STATE_ACTIVE)
        assert settle(lambda: client.get_model("wide").engines == 0)
        # Attachable again, and everything goes back when the model goes.
        again = Worker(d, "wide", "--short")
        start.workers.append(again)  # type: ignore[attr-defined]
        again.quit()
        client.unload_model("wide")
        assert used(client) == (0, 0)
        assert settle(lambda: open_fds(d.proc.pid) == baseline), open_fds(d.proc.pid)


def test_an_engine_that_does_not_let_go_is_revoked_and_its_access_faults(
    start: Callable[..., Daemon],
) -> None:
    d = start(config='[agents]\nquiesce_timeout = "1s"\n')
    path = make_checkpoint(d.models / "tiny", SMALL)
    with Client(socket=str(d.socket)) as client:
        client.load_model("tiny", str(path))
        worker = Worker(d, "tiny", "--stall")
        start.workers.append(worker)  # type: ignore[attr-defined]
        model = client.sleep_model("tiny")  # goes on after a second
        assert model.state == common_pb2.MODEL_STATE_ASLEEP and model.engines == 0
        assert "did not let go of the weights within 1s; detached" in model.last_transition.note
        assert "pid" in model.last_transition.note
        assert used(client)[0] == 0  # really freed, though the engine never unmapped
        shown = d.ctl("get", "tiny").stdout
        assert "Note:" in shown and "detached" in shown and "Engines:" not in shown
        # Its mapping no longer holds any bytes: reading a weight kills it.
        worker.ask_nowait("touch")
        worker.proc.communicate(timeout=60)
        assert worker.proc.returncode == -signal.SIGBUS


LIAR = """
import queue, sys
from torpor import Client
from torpor.v1 import agent_pb2, agent_pb2_grpc
client = Client(socket=sys.argv[1])
hello = agent_pb2.Hello(model_id=sys.argv[2], pid=int(sys.argv[3]))  # someone else's pid
requests = queue.SimpleQueue()
requests.put(agent_pb2.AttachRequest(hello=hello))
call = agent_pb2_grpc.AgentServiceStub(client.channel).Attach(iter(requests.get, None))
print(next(call).attached.attachment_id, flush=True)
for _ in call:  # never answers a Quiesce
    pass
"""


def test_an_engine_that_does_not_let_go_is_killed_where_configured(
    start: Callable[..., Daemon],
) -> None:
    d = start(config='[agents]\nquiesce_timeout = "1s"\non_quiesce_timeout = "kill"\n')
    path = make_checkpoint(d.models / "tiny", SMALL)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    liar = subprocess.Popen(
        [sys.executable, "-c", LIAR, str(d.socket), "tiny", str(bystander.pid)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with Client(socket=str(d.socket)) as client:
            client.load_model("tiny", str(path))
            worker = Worker(d, "tiny", "--stall")
            start.workers.append(worker)  # type: ignore[attr-defined]
            assert liar.stdout is not None and liar.stdout.readline().strip()
            assert settle(lambda: client.get_model("tiny").engines == 2)
            model = client.sleep_model("tiny")
            assert model.state == common_pb2.MODEL_STATE_ASLEEP and model.engines == 0
            note = model.last_transition.note
            assert f"pid {worker.proc.pid}" in note and "detached and killed" in note, note
            worker.proc.communicate(timeout=60)
            assert worker.proc.returncode == -signal.SIGKILL
            # The liar claimed the bystander's pid but never took an fd, so that
            # pid was never proven: it is detached, and nobody is killed for it.
            assert f"pid {bystander.pid}" in note
            assert bystander.poll() is None
    finally:
        for proc in (liar, bystander):
            proc.kill()
            proc.communicate(timeout=30)


def test_one_engine_attaches_to_two_models_and_each_sleeps_alone(
    start: Callable[..., Daemon],
) -> None:
    d = start()
    a = make_checkpoint(d.models / "a", SMALL, seed=1)
    b = make_checkpoint(d.models / "b", SMALL, seed=2)
    script = f"""
import json, sys, torch
from torpor import Client
from torpor.agent import attach
client = Client(socket={str(d.socket)!r})
ma, mb = attach("a", client=client), attach("b", client=client)
print(json.dumps({{"ready": True}}), flush=True)
sys.stdin.readline()
print(json.dumps({{"a": ma.ready(), "b": mb.ready(),
                  "b_sum": float(sum(t.float().sum() for t in mb.state_dict().values()))}}),
      flush=True)
sys.stdin.readline()
"""
    with Client(socket=str(d.socket)) as client:
        client.load_model("a", str(a))
        client.load_model("b", str(b))
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert json.loads(proc.stdout.readline()) == {"ready": True}
            client.sleep_model("a")
            proc.stdin.write("\n")
            proc.stdin.flush()
            seen = json.loads(proc.stdout.readline())
            assert seen["a"] is False and seen["b"] is True
            state = load_file(str(b))
            assert seen["b_sum"] == pytest.approx(
                float(sum(t.float().sum() for t in state.values()))
            )
            assert client.get_model("b").engines == 1 and client.get_model("a").engines == 1
        finally:
            proc.kill()
            proc.communicate()
