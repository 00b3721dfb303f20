"""Where torpord's Unix socket is by default, and whether its directory is safe.

One rule for both sides: torpord (its default `server.socket`) and the client
(`Client()`, `torporctl`) import it from here, so they cannot disagree.

Default socket: `/run/torpor/torpor.sock` for root; else
`$XDG_RUNTIME_DIR/torpor/torpor.sock` when `$XDG_RUNTIME_DIR` is an absolute
path (the XDG spec says a relative one is invalid and must be ignored); else
`/tmp/torpor-$UID/torpor.sock`. The client also honours `$TORPOR_SOCKET`.

A socket is only as trustworthy as its directory: whoever can write the
directory can replace the socket with their own and answer the owner's calls
(`/tmp/torpor-$UID` made first by another user is the classic case, the one
ssh-agent and tmux refuse too). So before listening on, or connecting to, a
socket, both sides check (`check_socket_dir`):

- the socket's directory is a directory, writable by neither its group nor
  others, and owned by the user or by root. The client also accepts another
  owner when the directory's parent is owned by root and writable by nobody
  else: only root can have made it and handed it over (systemd's
  `RuntimeDirectory=` gives `/run/torpor` to user `torpor` that way);
- every directory above it (as given and with symlinks resolved) is owned by
  root, the user, or that owner, and is not writable by group or others unless
  it is sticky (`/tmp`: others cannot rename or remove what is not theirs).

torpord makes a missing directory itself (0700, or 0750/0755 when the socket's
mode lets group or others connect) and never changes the mode or owner of a
directory it did not make.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Mapping

__all__ = [
    "DEFAULT_ROOT_SOCKET",
    "UnsafeSocketDir",
    "check_socket_dir",
    "default_socket_path",
    "standard_socket_path",
]

DEFAULT_ROOT_SOCKET = "/run/torpor/torpor.sock"

_GROUP_OR_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH


def standard_socket_path(environ: Mapping[str, str], euid: int) -> str:
    """torpord's default socket for a daemon run by `euid` with `environ`."""
    if euid == 0:
        return DEFAULT_ROOT_SOCKET
    runtime_dir = environ.get("XDG_RUNTIME_DIR", "")
    if runtime_dir and os.path.isabs(runtime_dir):
        return os.path.join(runtime_dir, "torpor", "torpor.sock")
    # Not tempfile.gettempdir(): $TMPDIR can be long, and socket paths must fit in 107 bytes.
    return f"/tmp/torpor-{euid}/torpor.sock"


def default_socket_path(environ: Mapping[str, str] | None = None, euid: int | None = None) -> str:
    """The socket a client uses by default: `$TORPOR_SOCKET` if set, else the
    daemon's default (`standard_socket_path`). `environ` and `euid` default to
    the process's own (they are parameters so the rule can be tested)."""
    env = os.environ if environ is None else environ
    explicit = env.get("TORPOR_SOCKET")
    if explicit:
        return explicit
    return standard_socket_path(env, os.geteuid() if euid is None else euid)


class UnsafeSocketDir(Exception):
    """A socket directory that someone other than its user (or root) could change."""

    def __init__(self, directory: str, why: str) -> None:
        super().__init__(f"{directory} {why}")
        self.directory = directory
        self.why = why


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _writable_by(mode: int) -> str:
    bits = ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others"))
    who = [name for bit, name in bits if mode & bit]
    return f"is writable by {' and '.join(who)} (mode {stat.S_IMODE(mode):04o})"


def _ancestors(path: str) -> list[str]:
    """The directories above `path`, from "/" down."""
    found: list[str] = []
    parent = os.path.dirname(path)
    while True:
        found.append(parent)
        if parent == os.path.dirname(parent):
            return found[::-1]
        parent = os.path.dirname(parent)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _made_by_root(directory: str) -> bool:
    """Whether only root can have created `directory` (and chosen its owner)."""
    parent = _stat(os.path.dirname(directory))
    return parent is not None and parent.st_uid == 0 and not parent.st_mode & _GROUP_OR_OTHER_WRITE


def check_socket_dir(
    directory: str | os.PathLike[str], *, client: bool, euid: int | None = None
) -> bool:
    """Check the rules above for a socket's directory (see the module's doc).

    True when it exists and is safe, False when it does not exist (yet): the
    directories above it that do exist were safe. Raises `UnsafeSocketDir`
    naming the directory and why. `client` selects the client's owner rule;
    `euid` defaults to the process's own.
    """
    uid = os.geteuid() if euid is None else euid
    given = os.path.abspath(os.fspath(directory))
    real = os.path.realpath(given)
    found = _stat(given)
    trusted = {0, uid}
    if client and found is not None and _made_by_root(real):
        trusted.add(found.st_uid)
    owners = "root" if uid == 0 else f"{'you' if client else 'torpord'} ({_user(uid)}) or root"
    for above in dict.fromkeys([*_ancestors(given), *_ancestors(real)]):
        st = _stat(above)
        if st is None:
            continue  # not there yet: torpord makes it (safe) before the socket's directory
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeSocketDir(above, "is not a directory")
        if st.st_uid not in trusted:
            raise UnsafeSocketDir(above, f"is owned by {_user(st.st_uid)}, not by {owners}")
        if st.st_mode & _GROUP_OR_OTHER_WRITE and not st.st_mode & stat.S_ISVTX:
            raise UnsafeSocketDir(above, _writable_by(st.st_mode))
    if found is None:
        return False
    if not stat.S_ISDIR(found.st_mode):
        raise UnsafeSocketDir(given, "is not a directory")
    if found.st_uid not in trusted:
        raise UnsafeSocketDir(given, f"is owned by {_user(found.st_uid)}, not by {owners}")
    if found.st_mode & _GROUP_OR_OTHER_WRITE:
        raise UnsafeSocketDir(given, _writable_by(found.st_mode))
    return True
