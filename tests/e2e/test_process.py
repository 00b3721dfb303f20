"""The daemon as a process: notify, signals, stacks, sockets, config errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from torpor.testing import make_checkpoint

from .conftest import GRPCURL, Daemon, free_port


def log_events(d: Daemon) -> list[dict[str, object]]:
    return [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]


def test_sigterm_drains_frees_and_says_stopping(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    d.wait_ready()
    ckpt = make_checkpoint(d.models / "m", layers=8, hidden=512, shards=2)
    d.call("torpor.v1.ModelService/LoadModel", {"model_id": "m", "source": str(ckpt)})
    assert d.stop(signal.SIGTERM) == 0
    assert "STOPPING=1" in d.notifications
    events = [e["event"] for e in log_events(d)]
    assert events.index("signal received") < events.index("stopped")
    # The load began before the signal: it was let finish (or rolled back), never cut mid-slab.
    assert "transition started" in events
    assert "transition done" in events or "transition failed" in events
    assert not d.socket.exists()


def test_second_signal_forces_exit(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    d.wait_ready()
    # Stopped, the process gets both signals before it can act on the first;
    # two different signals, since the kernel merges two pending SIGTERMs.
    d.proc.send_signal(signal.SIGSTOP)
    d.proc.send_signal(signal.SIGTERM)
    d.proc.send_signal(signal.SIGINT)
    d.proc.send_signal(signal.SIGCONT)
    assert d.stop() == 1
    assert "second signal: exiting now" in d.log()
    # Both sockets are gone even so: the next start finds no stale socket.
    assert not d.socket.exists()
    assert not d.socket.with_name(d.socket.name + ".fds").exists()


def test_sigusr1_logs_every_task_stack(daemon: Daemon) -> None:
    daemon.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stacks = [e for e in log_events(daemon) if e["event"] == "stacks"]
        if stacks:
            break
        time.sleep(0.05)
    assert stacks, daemon.log()
    assert stacks[0]["task_count"] >= 1  # type: ignore[operator]
    assert "MainThread" in json.dumps(stacks[0]["threads"])


def test_a_second_daemon_refuses_a_live_socket_but_takes_a_stale_one(tmp_path: Path) -> None:
    first = Daemon(tmp_path / "a")
    first.wait_ready()
    config = first.config_path
    second = subprocess.run(
        [sys.executable, "-m", "torpord", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert "another torpord is listening" in second.stdout + second.stderr
    first.proc.kill()  # leaves its socket file behind
    first.proc.wait()
    assert first.socket.exists()
    first.kill()
    third = Daemon(tmp_path / "a")
    try:
        third.wait_ready()
        assert third.call("torpor.v1.NodeService/GetNode")["node"]["backend"] == "BACKEND_HOST"
    finally:
        third.kill()


def test_config_errors_name_file_key_and_expectation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\n[host_pool]\ncapacity = "lots"\n')
    out = subprocess.run(
        [sys.executable, "-m", "torpord", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert str(bad) in out.stderr and "host_pool.capacity" in out.stderr and "lots" in out.stderr


def test_tcp_listener_on_loopback(tmp_path: Path) -> None:
    port = free_port()
    d = Daemon(tmp_path, args=("--tcp", f"127.0.0.1:{port}"), server="tcp_insecure = true\n")
    try:
        d.wait_ready()
        out = subprocess.run(
            [GRPCURL, "-plaintext", f"127.0.0.1:{port}", "torpor.v1.NodeService/GetNode"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["node"]["backend"] == "BACKEND_HOST"
        assert "the TCP listener asks for no credentials (server.tcp_insecure = true)" in d.log()
    finally:
        d.kill()
