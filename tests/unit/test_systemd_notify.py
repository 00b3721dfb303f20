"""torpord.systemd: sd_notify datagrams received on a real AF_UNIX socket."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from torpord import systemd


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound at a path in tmp_path, named by $NOTIFY_SOCKET."""
    # sun_path holds 107 bytes; pytest's tmp_path can be longer than that.
    path = tmp_path / "notify"
    if len(os.fsencode(path)) > 100:
        path = Path("/tmp") / f"torpor-notify-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        try:
            yield sock
        finally:
            path.unlink(missing_ok=True)


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket in the abstract namespace, named "@..." in $NOTIFY_SOCKET."""
    name = f"torpor-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_ready_on_a_path_socket(path_socket: socket.socket) -> None:
    assert systemd.ready("serving on /run/torpor/torpor.sock")
    assert path_socket.recv(4096) == b"READY=1\nSTATUS=serving on /run/torpor/torpor.sock"


def test_ready_on_an_abstract_socket(abstract_socket: socket.socket) -> None:
    assert systemd.ready()
    assert abstract_socket.recv(4096) == b"READY=1"


def test_stopping_status_and_watchdog(abstract_socket: socket.socket) -> None:
    assert systemd.stopping("draining 2 transitions")
    assert abstract_socket.recv(4096) == b"STOPPING=1\nSTATUS=draining 2 transitions"
    assert systemd.status("3 models, 1 sleeping")
    assert abstract_socket.recv(4096) == b"STATUS=3 models, 1 sleeping"
    assert systemd.watchdog()
    assert abstract_socket.recv(4096) == b"WATCHDOG=1"


def test_notify_joins_fields(path_socket: socket.socket) -> None:
    assert systemd.notify("RELOADING=1", "MONOTONIC_USEC=12")
    assert path_socket.recv(4096) == b"RELOADING=1\nMONOTONIC_USEC=12"


def test_status_text_stays_on_one_line(path_socket: socket.socket) -> None:
    # A newline would smuggle a second assignment (here READY=1) into the datagram.
    assert systemd.status("loading\nREADY=1")
    assert path_socket.recv(4096) == b"STATUS=loading READY=1"


def test_unset_variable_returns_false() -> None:
    assert systemd.notify("READY=1") is False
    assert systemd.ready("x") is False
    assert systemd.stopping() is False
    assert systemd.status("x") is False


def test_send_failure_returns_false_without_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.ready("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@torpor-nobody-{uuid.uuid4().hex}")
    assert systemd.ready("x") is False


def test_unsupported_address_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.ready() is False


def test_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    assert systemd.watchdog_usec() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_usec() == 30_000_000
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_usec() == 30_000_000
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_usec() is None  # meant for another process
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_usec() is None
