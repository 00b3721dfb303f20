"""torpor.socketpath: the default socket, and the rules a socket's directory must meet.

Real directories, owned by real (unprivileged) uids: the tests that chown
need root and skip without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torpor.socketpath import UnsafeSocketDir, check_socket_dir, standard_socket_path

NOBODY = 65534
USER = 64000

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chowns to other users")


def make_dir(path: Path, mode: int, uid: int | None = None) -> Path:
    path.mkdir()
    os.chmod(path, mode)
    if uid is not None:
        os.chown(path, uid, uid)
    return path


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """Like /tmp: world-writable and sticky."""
    return make_dir(tmp_path / "shared", 0o1777)


# -- the default socket ----------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "euid", "expected"),
    [
        ({"XDG_RUNTIME_DIR": "/run/user/0"}, 0, "/run/torpor/torpor.sock"),
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, "/run/user/1000/torpor/torpor.sock"),
        ({}, 1000, "/tmp/torpor-1000/torpor.sock"),
        ({"XDG_RUNTIME_DIR": ""}, 1000, "/tmp/torpor-1000/torpor.sock"),
        # The XDG spec: a relative path is invalid and must be ignored.
        ({"XDG_RUNTIME_DIR": "run/user/1000"}, 1000, "/tmp/torpor-1000/torpor.sock"),
        ({"XDG_RUNTIME_DIR": "./run"}, 1000, "/tmp/torpor-1000/torpor.sock"),
        ({"XDG_RUNTIME_DIR": "~/run"}, 1000, "/tmp/torpor-1000/torpor.sock"),
    ],
)
def test_standard_socket_path(environ: dict[str, str], euid: int, expected: str) -> None:
    assert standard_socket_path(environ, euid) == expected


# -- the socket's directory --------------------------------------------------------


@pytest.mark.parametrize("client", [True, False])
def test_own_private_dir_is_safe_and_a_missing_one_is_not_there_yet(
    shared: Path, client: bool
) -> None:
    assert check_socket_dir(make_dir(shared / "mine", 0o700), client=client) is True
    assert check_socket_dir(make_dir(shared / "mine-0755", 0o755), client=client) is True
    assert check_socket_dir(shared / "absent", client=client) is False
    assert check_socket_dir(shared / "absent" / "deeper", client=client) is False


@needs_root
@pytest.mark.parametrize("client", [True, False])
@pytest.mark.parametrize("mode", [0o777, 0o755, 0o700])
def test_another_users_dir_is_refused(shared: Path, client: bool, mode: int) -> None:
    theirs = make_dir(shared / "torpor-0", mode, NOBODY)
    with pytest.raises(UnsafeSocketDir) as info:
        check_socket_dir(theirs, client=client)
    assert info.value.directory == str(theirs)
    assert info.value.why == "is owned by uid 65534 (nobody), not by root"


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        (0o770, "is writable by its group (mode 0770)"),
        (0o703, "is writable by others (mode 0703)"),
        (0o777, "is writable by its group and others (mode 0777)"),
        (0o1777, "is writable by its group and others (mode 1777)"),  # sticky or not
    ],
)
def test_a_dir_others_may_write_is_refused(shared: Path, mode: int, why: str) -> None:
    open_dir = make_dir(shared / "torpor-0", mode)
    for client in (True, False):
        with pytest.raises(UnsafeSocketDir) as info:
            check_socket_dir(open_dir, client=client)
        assert str(info.value) == f"{open_dir} {why}"


def test_a_dir_above_that_others_may_write_is_refused_unless_sticky(tmp_path: Path) -> None:
    above = make_dir(tmp_path / "above", 0o777)
    mine = make_dir(above / "torpor", 0o700)
    with pytest.raises(UnsafeSocketDir) as info:
        check_socket_dir(mine, client=True)
    assert (info.value.directory, info.value.why) == (
        str(above),
        "is writable by its group and others (mode 0777)",
    )
    # Before torpord makes the directory, too.
    with pytest.raises(UnsafeSocketDir):
        check_socket_dir(above / "absent", client=False)
    os.chmod(above, 0o1777)  # sticky: others cannot rename or remove the directory
    assert check_socket_dir(mine, client=True) is True


def test_symlinks_are_judged_where_they_lead(tmp_path: Path, shared: Path) -> None:
    open_parent = make_dir(tmp_path / "open", 0o777)
    target = make_dir(open_parent / "torpor", 0o700)
    link = shared / "link"
    link.symlink_to(target)
    with pytest.raises(UnsafeSocketDir) as info:
        check_socket_dir(link, client=True)
    assert info.value.directory == str(open_parent)


def test_a_file_is_not_a_socket_dir(shared: Path) -> None:
    (shared / "file").write_text("")
    with pytest.raises(UnsafeSocketDir, match=r"is not a directory$"):
        check_socket_dir(shared / "file", client=True)
    with pytest.raises(UnsafeSocketDir, match=r"is not a directory$"):
        check_socket_dir(shared / "file" / "below", client=True)


@needs_root
def test_a_dir_root_made_for_a_service_is_trusted_by_clients_only(tmp_path: Path) -> None:
    """/run/torpor: systemd (root) makes it in root's /run and hands it to user torpor."""
    run = make_dir(tmp_path / "run", 0o755)  # root's, writable by root alone
    service = make_dir(run / "torpor", 0o750, NOBODY)
    assert check_socket_dir(service, client=True) is True
    with pytest.raises(UnsafeSocketDir):
        check_socket_dir(service, client=False)  # torpord itself must own it (or root)
    # In a directory others may write (even sticky), anyone could have made it.
    os.chmod(run, 0o1777)
    with pytest.raises(UnsafeSocketDir):
        check_socket_dir(service, client=True)


@needs_root
def test_the_users_own_dir_by_euid(shared: Path) -> None:
    theirs = make_dir(shared / f"torpor-{USER}", 0o700, USER)
    assert check_socket_dir(theirs, client=True, euid=USER) is True
    assert check_socket_dir(theirs, client=False, euid=USER) is True
    with pytest.raises(UnsafeSocketDir) as info:
        check_socket_dir(theirs, client=True, euid=NOBODY)
    assert info.value.why == f"is owned by uid {USER}, not by you (uid 65534 (nobody)) or root"
    with pytest.raises(UnsafeSocketDir) as info:
        check_socket_dir(theirs, client=False, euid=NOBODY)
    assert info.value.why.endswith("not by torpord (uid 65534 (nobody)) or root")
