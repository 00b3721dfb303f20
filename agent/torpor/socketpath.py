"""Where torpord's Unix socket is by default.

One rule for both sides: torpord (its default `server.socket`) and the client
(`Client()`, `torporctl`) import it from here, so they cannot disagree.

Default socket: `/run/torpor/torpor.sock` for root; else
`$XDG_RUNTIME_DIR/torpor/torpor.sock` when `$XDG_RUNTIME_DIR` is an absolute
path (the XDG spec says a relative one is invalid and must be ignored); else
`/tmp/torpor-$UID/torpor.sock`. The client also honours `$TORPOR_SOCKET`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["DEFAULT_ROOT_SOCKET", "default_socket_path", "standard_socket_path"]

DEFAULT_ROOT_SOCKET = "/run/torpor/torpor.sock"


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
