"""A socket directory another user could have made or can change is refused by
torpord and by torporctl; the owner's own directory works.

These tests act as other users (chown, and processes run as an unprivileged
uid), so they need root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acts as other users: needs root")

NOBODY = 65534  # "another user"
OWNER = 64000  # an unprivileged user running torpord and torporctl with the defaults


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A directory like /tmp: everyone may make entries, nobody may remove others'."""
    path = tmp_path / "shared"
    path.mkdir()
    os.chmod(path, 0o1777)
    return path


def make_dir(path: Path, uid: int, mode: int) -> Path:
    path.mkdir()
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


def torporctl(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torpor.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.mark.parametrize(
    ("uid", "mode", "why"),
    [
        (NOBODY, 0o777, "is owned by uid 65534"),
        (NOBODY, 0o755, "is owned by uid 65534"),
        (0, 0o770, "is writable by its group (mode 0770)"),
    ],
)
def test_a_socket_dir_others_could_change_is_refused(
    tmp_path: Path, shared: Path, uid: int, mode: int, why: str
) -> None:
    evil = make_dir(shared / "torpor-0", uid, mode)
    # The other user's socket, waiting for the owner's calls.
    trap = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    trap.bind(str(evil / "torpor.sock"))
    trap.listen()
    trap.setblocking(False)
    try:
        d = Daemon(tmp_path, args=("--socket", str(evil / "torpor.sock")))
        try:
            code = d.proc.wait(60)
        finally:
            d.kill()
        assert code == 1
        assert f"refusing the socket directory {evil}: it {why}" in d.log()
        # torpord changed nothing there: no mode, no owner, no socket of its own.
        st = evil.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, mode)
        assert sorted(os.listdir(evil)) == ["torpor.sock"]

        out = torporctl("--socket", str(evil / "torpor.sock"), "list")
        assert out.returncode == 4, out.stderr
        assert f"refusing torpord's socket {evil / 'torpor.sock'}: {evil} {why}" in out.stderr
        assert "UNSAFE_SOCKET_DIR" in out.stderr and "Traceback" not in out.stderr
        with pytest.raises(BlockingIOError):
            trap.accept()  # nobody knocked
    finally:
        trap.close()


def test_the_owners_own_socket_dir_works_and_is_left_as_it_is(tmp_path: Path, shared: Path) -> None:
    mine = make_dir(shared / "torpor-0", 0, 0o700)
    d = Daemon(tmp_path, args=("--socket", str(mine / "torpor.sock")))
    try:
        d.wait_ready()
        out = torporctl("--socket", str(mine / "torpor.sock"), "list")
        assert out.returncode == 0, out.stderr
        assert stat.S_IMODE(mine.stat().st_mode) == 0o700  # not widened to 0750
    finally:
        d.kill()


def test_torpord_makes_a_missing_socket_dir_for_the_socket_mode(tmp_path: Path) -> None:
    d = Daemon(tmp_path)  # socket_mode 0660: the group may enter, nobody else
    try:
        d.wait_ready()
        assert stat.S_IMODE(d.socket.parent.stat().st_mode) == 0o750
    finally:
        d.kill()


@pytest.fixture
def owner_home() -> Iterator[Path]:
    """A home for OWNER outside pytest's tmp (which only root may enter)."""
    home = Path(tempfile.mkdtemp(prefix="torpor-e2e-"))
    os.chown(home, OWNER, OWNER)
    try:
        yield home
    finally:
        shutil.rmtree(home)


def test_the_default_socket_of_a_user(owner_home: Path) -> None:
    """As OWNER, with $XDG_RUNTIME_DIR and no --socket: torpord and torporctl
    refuse another user's torpor/ there, and use the owner's own.

    (tests/unit/test_socketpath.py checks the same rules in-process, as root
    pretending to be OWNER, where this interpreter is root's alone.)
    """
    try:
        subprocess.run([sys.executable, "-c", ""], user=OWNER, check=True, timeout=60)
    except (PermissionError, subprocess.CalledProcessError):
        pytest.skip(f"{sys.executable} cannot be run by uid {OWNER} here")
    runtime = make_dir(owner_home / "run", OWNER, 0o700)
    config = owner_home / "torpord.toml"
    config.write_text(
        'version = 1\n[backend]\nkind = "host"\n[backend.host]\ndevice_capacity = "64MiB"\n'
        '[host_pool]\ncapacity = "64MiB"\n'
    )
    keep = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH")
    env = {key: os.environ[key] for key in keep if key in os.environ}
    env |= {"HOME": str(owner_home), "XDG_RUNTIME_DIR": str(runtime)}
    as_owner: dict[str, object] = {"env": env, "user": OWNER, "group": OWNER, "extra_groups": []}
    torpord = [sys.executable, "-m", "torpord", "--config", str(config)]

    evil = make_dir(runtime / "torpor", NOBODY, 0o755)
    out = torporctl("list", **as_owner)
    assert out.returncode == 4, out.stderr
    assert f"{evil} is owned by uid 65534" in out.stderr
    out = subprocess.run(torpord, capture_output=True, text=True, timeout=60, **as_owner)  # type: ignore[call-overload]
    assert out.returncode == 1
    assert f"refusing the socket directory {evil}" in out.stderr

    evil.rmdir()
    with open(owner_home / "torpord.log", "wb") as log:
        proc = subprocess.Popen(torpord, stdout=log, stderr=subprocess.STDOUT, **as_owner)  # type: ignore[call-overload]
    try:
        deadline = time.monotonic() + 30
        while (out := torporctl("list", **as_owner)).returncode == 3:
            assert proc.poll() is None, (owner_home / "torpord.log").read_text()
            assert time.monotonic() < deadline, out.stderr
            time.sleep(0.2)
        assert out.returncode == 0, out.stderr
        made = (runtime / "torpor").stat()
        assert (made.st_uid, stat.S_IMODE(made.st_mode)) == (OWNER, 0o750)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
