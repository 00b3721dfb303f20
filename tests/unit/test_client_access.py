"""torpor.Client and torporctl: credentials for TCP, and the socket-directory check.

Against the fake daemon of fake_daemon.py where a server is needed (it asks
for no credentials: the real daemon's checks are tests/e2e/test_tcp_access.py).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from torpor.cli.main import main
from torpor.client import Client
from torpor.errors import DAEMON_UNAVAILABLE, TorporError
from torpor.v1 import common_pb2

from .fake_daemon import Daemon, serve

NOBODY = 65534
USER = 64000
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chowns to other users")


@pytest.fixture
def daemon_models() -> dict[str, common_pb2.Model]:
    return {}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(secrets.token_hex(32) + "\n")
    os.chmod(path, 0o600)
    return path


# -- credentials ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token": "t" * 32}, "token: credentials are for an address"),
        ({"ca_cert": "/ca.pem", "client_key": "/k"}, "ca_cert, client_key: credentials are for"),
    ],
)
def test_the_socket_takes_no_credentials(
    tmp_path: Path, kwargs: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Client(socket=tmp_path / "t.sock", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token": "t" * 32, "token_file": "/t"}, "a token or a token file, not both"),
        ({"client_cert": "/c.pem", "ca_cert": "/ca.pem"}, "go together"),
        ({"client_key": "/c.key", "ca_cert": "/ca.pem"}, "go together"),
        ({"client_cert": "/c.pem", "client_key": "/c.key"}, "needs the CA certificate"),
        ({"token": "short"}, "not a bearer token"),
        ({"token": "has a space in it, long enough"}, "not a bearer token"),
    ],
)
def test_credentials_that_do_not_go_together(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Client(address="127.0.0.1:1", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("address", ["10.1.2.3:50051", "gpu-7:50051", "[2001:db8::1]:1"])
def test_a_token_goes_in_plaintext_to_loopback_only(address: str) -> None:
    with pytest.raises(ValueError) as info:
        Client(address=address, token="t" * 32)
    assert str(info.value).startswith(f"refusing to send the token to {address} without TLS")


def test_a_token_file_others_can_read_or_no_file_is_refused(
    tmp_path: Path, token_file: Path
) -> None:
    os.chmod(token_file, 0o644)
    with pytest.raises(ValueError, match=f"^{token_file}: is accessible by others"):
        Client(address="127.0.0.1:1", token_file=token_file)
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(ValueError, match="is not a regular file"):
        Client(address="127.0.0.1:1", token_file=tmp_path / "fifo")


def test_a_token_over_loopback(daemon: Daemon, token_file: Path) -> None:
    with Client(address=f"127.0.0.1:{daemon.port}", token_file=token_file, timeout=10) as c:
        assert c.get_node().hostname == "gpu-1"
    with Client(address=f"localhost:{daemon.port}", token="t" * 32, timeout=10) as c:
        assert c.list_models() == []


# -- torporctl's flags ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--token-file", "/t", "list"], "argument --token-file: only with --address"),
        (["--socket", "/a.sock", "--cacert", "/ca", "list"], "argument --cacert: only with"),
        (["list", "--key", "/k"], "argument --key: only with --address"),
        (["--address", "127.0.0.1:1", "--cert", "/c", "list"], "go together"),
        (["--address", "127.0.0.1:1", "--cert", "/c", "--key", "/k", "list"], "needs the CA"),
    ],
)
def test_credential_flag_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_plaintext_token_to_another_host_exits_2(
    token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--address", "10.1.2.3:1", "--token-file", str(token_file), "list"]) == 2
    assert "refusing to send the token to 10.1.2.3:1 without TLS" in capsys.readouterr().err


def test_torpor_token_file_is_for_addresses_only(
    daemon: Daemon,
    tmp_path: Path,
    token_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TORPOR_TOKEN_FILE", str(tmp_path / "absent"))
    assert main(["--socket", str(daemon.socket), "list"]) == 0  # not read for the socket
    assert main(["--address", f"127.0.0.1:{daemon.port}", "list"]) == 2
    assert f"{tmp_path / 'absent'}: cannot open it" in capsys.readouterr().err
    monkeypatch.setenv("TORPOR_TOKEN_FILE", str(token_file))
    assert main(["--address", f"127.0.0.1:{daemon.port}", "list"]) == 0


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
