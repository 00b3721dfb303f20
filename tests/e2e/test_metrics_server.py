"""The /metrics HTTP server of a real torpord: what it refuses, what a slow
or hostile client gets, and its config: off, loopback only, a port taken."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from torpord import __version__
from torpord.metrics.http import MAX_CONNECTIONS

from .conftest import Daemon
from .scrape import get, metrics_daemon, metrics_node, scrape, value


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    with metrics_node(tmp_path) as node:
        yield node


def raw(port: int, data: bytes) -> bytes:
    """Send `data` as it is, and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(data)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    return got


def unanswered(s: socket.socket) -> bool:
    """Whether the server closed `s` without a word (or reset it)."""
    try:
        return read_all(s) == b""
    except ConnectionResetError:
        return True


def status_of(answer: bytes) -> int:
    return int(answer.split(b"\r\n", 1)[0].split(b" ")[1])


def test_other_paths_methods_and_malformed_requests_are_refused(
    node: tuple[Daemon, int],
) -> None:
    _, port = node
    assert get(port, "/")[0] == 404
    assert get(port, "/metrics/x")[0] == 404
    status, headers, _ = get(port, method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert get(port, method="DELETE")[0] == 405
    for garbage in (
        b"GARBAGE\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /m\xe9trics HTTP/1.1\r\n\r\n",
    ):
        answer = raw(port, garbage)
        assert status_of(answer) == 400, garbage
        assert answer.split(b"\r\n\r\n", 1)[1].startswith(b"400 Bad Request")
    # A well-formed request by hand gets the metrics, and the connection closes.
    answer = raw(port, b"GET /metrics?x=1 HTTP/1.0\r\nHost: here\r\n\r\n")
    assert status_of(answer) == 200 and b"\r\nConnection: close\r\n" in answer
    assert b"torpor_build_info{" in answer


def test_an_oversized_request_is_refused(node: tuple[Daemon, int]) -> None:
    _, port = node
    big = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    assert status_of(raw(port, big)) == 431
    assert get(port)[0] == 200  # (and the server goes on)


def test_a_silent_client_is_dropped_and_blocks_no_scrape(node: tuple[Daemon, int]) -> None:
    _, port = node
    with (
        socket.create_connection(("127.0.0.1", port), timeout=60) as silent,
        socket.create_connection(("127.0.0.1", port), timeout=60) as half,
    ):
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: he")  # and nothing more
        for _ in range(3):  # others are served meanwhile
            assert value(scrape(port), "torpor_build_info", version=__version__, backend="host")
        # Each is answered 408 and closed after the read timeout.
        assert status_of(read_all(silent)) == 408
        assert status_of(read_all(half)) == 408
    with socket.create_connection(("127.0.0.1", port), timeout=60) as empty:
        empty.shutdown(socket.SHUT_WR)  # connects, sends nothing, and closes
        assert read_all(empty) == b""
    assert get(port)[0] == 200


def test_connections_held_without_a_request_do_not_keep_scrapes_out(
    node: tuple[Daemon, int],
) -> None:
    # A local user holds every connection the server allows, each with a
    # request head it never finishes, and takes back each one it loses: a
    # real scrape still gets through, each time in the place of the one that
    # has waited longest, and only that one.
    _, port = node

    def hold() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: he")  # and nothing more
        return s

    held = [hold() for _ in range(MAX_CONNECTIONS)]
    try:
        for _ in range(3):
            assert value(scrape(port), "torpor_build_info", version=__version__, backend="host")
            held.append(hold())
        assert [unanswered(s) for s in held[:3]] == [True] * 3  # dropped, oldest first
        # The next was kept: it gets its answer when its time to send is up.
        assert status_of(read_all(held[3])) == 408
    finally:
        for s in held:
            s.close()
    assert get(port)[0] == 200


def listening_tcp(pid: int) -> list[str]:
    """The TCP sockets process `pid` listens on (their local addresses, hex)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        if str(target).startswith("socket:["):
            inodes.add(str(target)[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                found.append(fields[1])
    return found


def test_metrics_are_off_unless_listen_is_set(tmp_path: Path) -> None:
    off = Daemon(tmp_path / "off", config='[metrics]\nlisten = ""\n')
    try:
        off.wait_ready()
        assert listening_tcp(off.proc.pid) == []
    finally:
        off.kill()
    on, port = metrics_daemon(tmp_path / "on")
    try:
        assert listening_tcp(on.proc.pid) == [f"0100007F:{port:04X}"]
    finally:
        on.kill()


def test_a_non_loopback_listen_needs_allow_remote(tmp_path: Path) -> None:
    config = tmp_path / "torpord.toml"
    config.write_text('version = 1\n[metrics]\nlisten = "0.0.0.0:9400"\n')
    cmd = [sys.executable, "-m", "torpord", "--config", str(config), "--check-config"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "metrics.listen" in out.stderr and "metrics.allow_remote = true" in out.stderr
    config.write_text('version = 1\n[metrics]\nlisten = "0.0.0.0:9400"\nallow_remote = true\n')
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_a_port_in_use_stops_the_daemon_naming_metrics_listen(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = Daemon(tmp_path, config=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        try:
            code = d.proc.wait(60)
        finally:
            d.kill()
    assert code == 1
    log = d.log()
    assert "cannot listen" in log and f"metrics.listen 127.0.0.1:{port}" in log
    assert "in use" in log
    assert not d.socket.exists()  # (it stopped before the gRPC socket listened)


def test_bytes_sent_after_the_request_do_not_cut_the_answer(node: tuple[Daemon, int]) -> None:
    # (A GET with a body, or a client that sends ahead: the server reads only
    # the head. Closing with bytes unread resets the connection, and a reset
    # may drop the end of the answer before the client has read it.)
    _, port = node
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: here\r\nContent-Length: 200000\r\n\r\n")
        s.sendall(b"y" * 200_000)
        answer = read_all(s)  # (ConnectionResetError if reset)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert status_of(answer) == 200
    length = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")]
    assert len(body) == int(length[0].split(b":")[1]) and b"torpor_build_info{" in body


def test_an_absolute_form_request_target_is_served(node: tuple[Daemon, int]) -> None:
    # (RFC 9112 3.2.2: a server accepts it; a client talking through a proxy sends it.)
    _, port = node
    answer = raw(port, f"GET http://127.0.0.1:{port}/metrics HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status_of(answer) == 200 and b"torpor_build_info{" in answer
    for target in (f"http://127.0.0.1:{port}/other", "HTTP://h", "http://h?metrics"):
        answer = raw(port, f"GET {target} HTTP/1.1\r\n\r\n".encode())
        assert status_of(answer) == 404, target
    for target in ("ftp://x/metrics", "http:/metrics", "http:///metrics", "http://h#/metrics"):
        answer = raw(port, f"GET {target} HTTP/1.1\r\n\r\n".encode())
        assert status_of(answer) == 400, target


def test_bare_lf_line_ends_are_accepted(node: tuple[Daemon, int]) -> None:
    # (RFC 9112 2.2: a recipient may take a bare LF as a line's end; what
    # `printf 'GET /metrics HTTP/1.1\nHost: x\n\n' | nc` sends.)
    _, port = node
    for request in (
        b"GET /metrics HTTP/1.1\nHost: x\n\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\n\r\n",  # (mixed)
        b"\r\n\nGET /metrics HTTP/1.0\n\n",  # (empty lines before the request line)
    ):
        answer = raw(port, request)
        assert status_of(answer) == 200 and b"torpor_build_info{" in answer, request
    assert status_of(raw(port, b"GET /nothing HTTP/1.1\n\n")) == 404
    # A CR that ends no line is still refused.
    assert status_of(raw(port, b"GET /metrics HTTP/1.1\nHost: x\ry\n\n")) == 400
    # And the head is bounded however its lines end.
    many = b"GET /metrics HTTP/1.1\n" + b"X-A: b\n" * 2000 + b"\n"
    assert status_of(raw(port, many)) == 431
