"""Engines attach to a real torpord: zero-copy tensors, shared memory, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from torpor.testing import make_checkpoint

from .conftest import Daemon
from .observe import settle

pytest.importorskip("torch")

ENGINE = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from safetensors.torch import load_file
    from torpor import Client, TorporError
    from torpor.agent import attach

    socket, model_id, source = sys.argv[1:4]
    hold = sys.argv[4:] == ["hold"]  # attached until the test writes a line

    def raw(t):
        return t.contiguous().view(-1).view(torch.uint8)

    with Client(socket=socket) as client:
        try:
            m = attach(model_id, client=client, engine="test")
        except TorporError as err:
            print(json.dumps({"error": err.reason}), flush=True)
            sys.exit(1)
        with m:
            sd = m.state_dict()
            ref = load_file(source)
            same = all(raw(sd[name]).equal(raw(t)) for name, t in ref.items())
            maps = open("/proc/self/maps").read()
            print(json.dumps({
                "tensors": len(sd), "reference": len(ref), "same": same,
                "mapped_from_daemon": maps.count("/memfd:torpor:" + model_id + ":"),
            }), flush=True)
            if hold:
                sys.stdin.readline()
    """
)


def engine(d: Daemon, model_id: str, source: str, hold: bool = False) -> subprocess.Popen[str]:
    """An engine process that attaches, reports, and (`hold`) stays attached
    until a line comes on its stdin."""
    return subprocess.Popen(
        [sys.executable, "-c", ENGINE, str(d.socket), model_id, source]
        + (["hold"] if hold else []),
        stdin=subprocess.PIPE if hold else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_an_engine_gets_the_weights_without_a_copy(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=4, hidden=64, dtype="BF16")
    daemon.ctl("load", "m", str(ckpt))
    out, err = engine(daemon, "m", str(ckpt)).communicate(timeout=120)
    report = json.loads(out)
    assert report["same"], err
    assert report["tensors"] == report["reference"]
    assert report["mapped_from_daemon"] >= 6  # one mapping per layer, of the daemon's memfds


def test_engines_share_the_slabs_and_let_go_when_the_model_sleeps(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=2)
    daemon.ctl("load", "m", str(ckpt))
    node = json.loads(daemon.ctl("--json", "node").stdout)["node"]
    used = sum(int(dev.get("used_bytes", 0)) for dev in node["devices"])
    engines = [engine(daemon, "m", str(ckpt), hold=True) for _ in range(2)]
    try:
        reports = [json.loads(e.stdout.readline()) for e in engines]  # type: ignore[union-attr]
        assert all(r["same"] for r in reports)
        node = json.loads(daemon.ctl("--json", "node").stdout)["node"]
        assert sum(int(dev.get("used_bytes", 0)) for dev in node["devices"]) == used  # counted once
        assert json.loads(daemon.ctl("--json", "get", "m").stdout)["model"]["engines"] == 2
        # Both engines quiesce (unmap and acknowledge); then the memory is freed.
        model = json.loads(daemon.ctl("--json", "sleep", "m").stdout)["model"]
        assert model["state"] == "MODEL_STATE_ASLEEP" and model["engines"] == 2
        assert "note" not in model["last_transition"]
        node = json.loads(daemon.ctl("--json", "node").stdout)["node"]
        assert sum(int(dev.get("used_bytes", 0)) for dev in node["devices"]) == 0
    finally:
        for e in engines:
            e.communicate("\n", timeout=60)
    assert settle(
        lambda: json.loads(daemon.ctl("--json", "get", "m").stdout)["model"].get("engines", 0) == 0
    )


def test_attaching_to_a_sleeping_model_is_refused(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=1)
    daemon.ctl("load", "m", str(ckpt), "--host")  # preloaded: asleep at level 1
    proc = engine(daemon, "m", str(ckpt))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and json.loads(out) == {"error": "MODEL_NOT_ACTIVE"}


MALICIOUS = textwrap.dedent(
    """
    import json, os, queue, subprocess, sys
    from torpor import Client
    from torpor.agent import request_fds
    from torpor.errors import TorporError
    from torpor.v1 import agent_pb2, agent_pb2_grpc

    socket, model_id, claim = sys.argv[1], sys.argv[2], sys.argv[3]
    client = Client(socket=socket)
    pid = os.getpid() if claim == "self" else int(claim)
    hello = agent_pb2.AttachRequest(hello=agent_pb2.Hello(model_id=model_id, pid=pid))
    stub = agent_pb2_grpc.AgentServiceStub(client.channel)
    requests = queue.SimpleQueue()  # the stream stays open until None: the attachment lives
    requests.put(hello)
    call = stub.Attach(iter(requests.get, None))
    attached = next(call).attached
    results = {}
    # 1. Ask with the id from this process, having claimed another pid (or our own).
    try:
        request_fds(attached.fd_socket, attached.attachment_id)
        results["own"] = "granted"
    except TorporError as err:
        results["own"] = err.reason
    # 2. Hand the id to another process and let it ask.
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from torpor.agent import request_fds\\n"
         "from torpor.errors import TorporError\\n"
         "try:\\n request_fds(sys.argv[1], sys.argv[2]); print('granted')\\n"
         "except TorporError as e: print(e.reason)", attached.fd_socket, attached.attachment_id],
        capture_output=True, text=True)
    results["other"] = child.stdout.strip()
    # 3. A made-up id.
    try:
        request_fds(attached.fd_socket, "0" * 32)
        results["made_up"] = "granted"
    except TorporError as err:
        results["made_up"] = err.reason
    # 4. Another model's slabs, with this attachment.
    try:
        request_fds(attached.fd_socket, attached.attachment_id, model_id="other")
        results["other_model"] = "granted"
    except TorporError as err:
        results["other_model"] = err.reason
    print(json.dumps(results), flush=True)
    requests.put(None)
    call.cancel()
    """
)


@pytest.mark.parametrize(("claim", "own"), [("self", "granted"), ("1", "PID_MISMATCH")])
def test_fds_go_only_to_the_process_that_attached(daemon: Daemon, claim: str, own: str) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=1)
    daemon.ctl("load", "m", str(ckpt))
    daemon.ctl("load", "other", str(ckpt))
    out = subprocess.run(
        [sys.executable, "-c", MALICIOUS, str(daemon.socket), "m", claim],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert results == {
        "own": own,
        "other": "PID_MISMATCH",
        "made_up": "UNKNOWN_ATTACHMENT",
        # Checked after the pid: a process that claimed another pid learns nothing more.
        "other_model": "MODEL_MISMATCH" if own == "granted" else "PID_MISMATCH",
    }
