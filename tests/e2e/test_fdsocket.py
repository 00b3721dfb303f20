"""The fd socket of a real torpord against strangers: malformed requests and
crowds of idle connections get error answers, take no thread each, and never
keep an engine from its fds."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from torpor.testing import make_checkpoint

from .conftest import Daemon

# An engine that attaches over gRPC and takes its model's fds.
ENGINE = textwrap.dedent(
    """
    import json, os, queue, sys
    from torpor import Client
    from torpor.agent import request_fds
    from torpor.v1 import agent_pb2, agent_pb2_grpc

    socket, model_id = sys.argv[1:3]
    client = Client(socket=socket)
    requests = queue.SimpleQueue()  # the stream stays open until None: the attachment lives
    requests.put(agent_pb2.AttachRequest(hello=agent_pb2.Hello(model_id=model_id, pid=os.getpid())))
    call = agent_pb2_grpc.AgentServiceStub(client.channel).Attach(iter(requests.get, None))
    attached = next(call).attached
    header, fds = request_fds(attached.fd_socket, attached.attachment_id, timeout=60)
    print(json.dumps({"layers": [layer["name"] for layer in header["layers"]], "fds": len(fds)}))
    for fd in fds:
        os.close(fd)
    requests.put(None)
    call.cancel()
    """
)


def run_engine(d: Daemon, model_id: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", ENGINE, str(d.socket), model_id],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def fd_socket(d: Daemon) -> str:
    return str(d.socket) + ".fds"


def answer_of(conn: socket.socket) -> dict[str, Any]:
    head = conn.recv(4, socket.MSG_WAITALL)
    assert len(head) == 4, "closed without an answer"
    (n,) = struct.unpack("<I", head)
    answer: dict[str, Any] = json.loads(conn.recv(n, socket.MSG_WAITALL))
    return answer


def test_an_engine_gets_its_fds_while_hundreds_of_connections_idle(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=2)
    daemon.ctl("load", "m", str(ckpt))
    assert run_engine(daemon, "m")["fds"] == 4  # pre, two blocks, post
    threads = threads_of(daemon.proc.pid)
    idle = []
    try:
        for _ in range(300):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(conn)
            conn.connect(fd_socket(daemon))
            conn.settimeout(60)
        report = run_engine(daemon, "m")
        assert report == {"layers": ["pre", "layers.0", "layers.1", "post"], "fds": 4}
        assert threads_of(daemon.proc.pid) <= threads + 8  # (not one per connection)
        reasons = {answer_of(conn)["error"]["reason"] for conn in idle}
        assert reasons <= {"FD_SOCKET_BUSY", "REQUEST_TIMEOUT"}
    finally:
        for conn in idle:
            conn.close()
    assert run_engine(daemon, "m")["fds"] == 4


def test_malformed_requests_are_answered_and_logged_at_a_bounded_rate(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=1)
    daemon.ctl("load", "m", str(ckpt))
    deep = b"[" * 100_000 + b"]" * 100_000
    for _ in range(100):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(60)
            conn.connect(fd_socket(daemon))
            conn.sendall(struct.pack("<I", len(deep)) + deep)
            error = answer_of(conn)["error"]
            assert (error["code"], error["reason"]) == ("INVALID_ARGUMENT", "BAD_REQUEST")
    assert run_engine(daemon, "m")["fds"] == 3
    log = daemon.log()
    assert 1 <= log.count("fd socket: request refused") <= 10
    assert "Traceback" not in log and "RecursionError" not in log
