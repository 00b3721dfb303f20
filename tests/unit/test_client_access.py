"""torpor.Client and torporctl: the socket-directory check, against the fake
daemon of fake_daemon.py where a server is needed."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from torpor.cli.main import main
from torpor.client import Client
from torpor.errors import DAEMON_UNAVAILABLE, TorporError
from torpor.v1 import common_pb2

from .fake_daemon import serve

NOBODY = 65534
USER = 64000
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chowns to other users")


@pytest.fixture
def daemon_models() -> dict[str, common_pb2.Model]:
    return {}


# -- the socket's directory ------------------------------------------------------------


def test_a_missing_socket_dir_is_checked_again_before_each_call(tmp_path: Path) -> None:
    later = tmp_path / "later"
    with Client(socket=later / "t.sock", timeout=10) as client:  # no daemon yet: fine
        with pytest.raises(TorporError) as info:
            client.get_node()
        assert (info.value.code, info.value.reason) == (
            grpc.StatusCode.UNAVAILABLE,
            DAEMON_UNAVAILABLE,
        )
        assert info.value.message.endswith("its directory does not exist")
        later.mkdir(mode=0o700)
        with serve(later / "t.sock", {}):
            assert client.get_node().hostname == "gpu-1"


@pytest.fixture
def as_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run as uid USER with $XDG_RUNTIME_DIR (USER's, 0700) in tmp_path; returns it."""
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, USER, USER)
    monkeypatch.setattr("os.geteuid", lambda: USER)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("TORPOR_SOCKET", raising=False)
    return runtime


@pytest.fixture
def trap(as_user: Path) -> Iterator[socket.socket]:
    """Another user's torpor/ in the default place, with their socket listening in it."""
    theirs = as_user / "torpor"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(theirs / "torpor.sock"))
    listener.listen()
    listener.setblocking(False)
    yield listener
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody called
    listener.close()


@needs_root
def test_the_default_socket_in_another_users_dir_is_refused(
    as_user: Path, trap: socket.socket, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TorporError) as info:
        Client()
    assert (info.value.code, info.value.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "UNSAFE_SOCKET_DIR",
    )
    theirs = as_user / "torpor"
    assert info.value.metadata == {"socket": str(theirs / "torpor.sock"), "directory": str(theirs)}
    assert f"{theirs} is owned by uid 65534" in info.value.message
    assert main(["list"]) == 4
    err = capsys.readouterr().err
    assert f"{theirs} is owned by uid 65534 (nobody), not by you (uid {USER})" in err
    assert "(FAILED_PRECONDITION UNSAFE_SOCKET_DIR)" in err and "hint: remove that directory" in err


@needs_root
def test_the_default_socket_in_the_users_own_dir_works(as_user: Path) -> None:
    mine = as_user / "torpor"
    mine.mkdir(mode=0o700)
    os.chown(mine, USER, USER)
    with serve(mine / "torpor.sock", {}), Client(timeout=10) as client:
        assert client.get_node().hostname == "gpu-1"
        assert main(["list"]) == 0
